"""Experiment tracking (实验追踪) that works without an account.

:class:`Tracker` keeps every logged metric in memory (for inline plots and the JSON report) and sends the same
metrics, config and artifacts to any of three backends, chosen by one argument:

* ``"wandb"``: Weights & Biases, in **offline** mode unless you are logged in (``wandb login`` or
  ``WANDB_API_KEY``). Offline runs land in ``<log_dir>/wandb/offline-run-*``; upload them later with
  ``wandb sync <log_dir>/wandb/offline-run-*`` (or ``wandb sync --sync-all`` inside ``<log_dir>``);
  :func:`read_wandb_offline` reads one back without uploading.
* ``"tensorboard"``: event files in ``<log_dir>/tensorboard/<run>``; view with
  ``tensorboard --logdir <log_dir>/tensorboard``. TensorBoard has no artifact store: artifacts are copied next
  to the event files.
* ``"mlflow"``: an MLflow SQLite store ``<log_dir>/mlflow.db`` with artifacts in ``<log_dir>/mlartifacts``;
  compare runs with ``mlflow.search_runs`` or, with the full ``mlflow`` package, ``mlflow ui --backend-store-uri
  sqlite:///<log_dir>/mlflow.db``. (MLflow 3 has put the plain-folder store in maintenance mode; SQLite is its
  recommended local store.)

No key or token is ever written to a log, a notebook or a report.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import shutil
import struct
import time
from pathlib import Path

BACKENDS = ("wandb", "tensorboard", "mlflow")


def wandb_logged_in() -> bool:
    """True if W&B credentials exist (environment or ~/.netrc). Never reads the key's value out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def mlflow_uri(log_dir) -> str:
    return f"sqlite:///{Path(log_dir).resolve() / 'mlflow.db'}"


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested config → {"a.b": value} (MLflow params are flat strings)."""
    out = {}
    for k, v in (config or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """One run: ``log(metrics, step)``, ``log_artifact(path)``, ``log_figure(fig, name)``, then ``finish()``."""

    def __init__(self, run_name: str, config: dict | None = None, backends=(), log_dir=None, project="llm-training-lab"):
        unknown = set(backends) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown tracking backend(s) {sorted(unknown)}; choose from {BACKENDS}")
        self.run_name, self.history, self.config = run_name, [], dict(config or {})
        self.log_dir = Path(log_dir) if log_dir else None
        self._wandb = self._tb = self._mlflow = None
        if backends and self.log_dir is None:
            raise ValueError("tracking backends need a log_dir to write to")
        if "wandb" in backends:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
            (self.log_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=project, name=run_name, config=self.config, dir=str(self.log_dir), mode=mode,
                settings=wandb.Settings(silent=True, console="off"),
            )
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.log_dir / "tensorboard" / run_name))
            self._tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat(self.config).items()))
        if "mlflow" in backends:
            import logging

            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables"

            client = MlflowClient(mlflow_uri(self.log_dir))
            exp = client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                project, artifact_location=(self.log_dir / "mlartifacts").resolve().as_uri())
            run = client.create_run(exp_id, run_name=run_name)
            self._mlflow = (client, run.info.run_id)
            for k, v in _flat(self.config).items():
                client.log_param(run.info.run_id, k, str(v)[:6000])

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            ts = int(1000 * time.time())
            client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_artifact(self, path) -> None:
        """Keep a file with the run (a checkpoint manifest, a report, a plot)."""
        path = Path(path)
        if self._wandb is not None:
            import wandb

            artifact = wandb.Artifact(f"{self.run_name}-{path.stem}".replace("/", "-"), type="file")
            artifact.add_file(str(path))
            self._wandb.log_artifact(artifact)
        if self._tb is not None:
            shutil.copy2(path, Path(self._tb.log_dir) / path.name)
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.log_artifact(run_id, str(path))

    def log_figure(self, fig, name: str, step: int | None = None) -> None:
        """A matplotlib figure, as each backend shows images (at the last logged step unless ``step`` is given:
        W&B drops anything logged at an earlier step than one it has seen)."""
        if step is None:
            step = self.history[-1]["step"] if self.history else 0
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(fig)}, step=step)
        if self._tb is not None:
            self._tb.add_figure(name, fig, step, close=False)
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.log_figure(run_id, fig, f"{name}.png")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.history if key in r and math.isfinite(r[key])]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id)
            self._mlflow = None


# --- reading runs back (comparisons in a notebook, and the tests) ------------------------------------------------


def read_tensorboard(log_dir, run_name: str) -> dict:
    """{metric: [(step, value), ...]} from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(log_dir) / "tensorboard" / run_name), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_mlflow(log_dir, project: str = "llm-training-lab") -> dict:
    """{run name: {"params": {...}, "metrics": {metric: [(step, value), ...]}}} of an MLflow experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri(log_dir))
    exp = client.get_experiment_by_name(project)
    if exp is None:
        return {}
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        metrics = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
                   for k in run.data.metrics}
        out[run.info.run_name] = {"params": dict(run.data.params), "metrics": metrics}
    return out


def _leveldb_records(data: bytes):
    """The records of a W&B transaction log: LevelDB's log format (32 KiB blocks; each chunk has a 7-byte header
    of checksum, length and type: 1 whole record, 2 first piece, 3 middle, 4 last) after a 7-byte W&B header."""
    block, pos, pieces = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind in (2, 3):
            pieces = (pieces if kind == 3 else b"") + chunk
        elif kind == 4:
            yield pieces + chunk
        elif kind == 0 and length == 0:
            pos += block - pos % block


def read_wandb_offline(run_dir) -> dict:
    """{"name", "config": {...}, "metrics": {metric: [(step, value), ...]}} of an offline W&B run folder
    (``<log_dir>/wandb/offline-run-*``), read from its ``run-*.wandb`` log without uploading anything."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    config, metrics, name = {}, {}, None
    for raw in _leveldb_records(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                if not k.startswith("_") and isinstance(v, (int, float)):
                    metrics.setdefault(k, []).append((items.get("_step", rec.history.step.num), v))
        if kind == "run":
            name = rec.run.display_name or name
        if kind in ("run", "config"):
            update = rec.run.config.update if kind == "run" else rec.config.update
            for i in update:
                config[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items() if not k.startswith("_")}
    return {"name": name, "config": config, "metrics": metrics}


def wandb_offline_runs(log_dir) -> list[Path]:
    return sorted((Path(log_dir) / "wandb").glob("offline-run-*"))
