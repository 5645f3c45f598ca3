"""Experiment tracking that works without an account.

:class:`Tracker` keeps every logged metric in memory (for inline matplotlib plots
and the JSON report) and forwards it to optional backends:

* ``"wandb"``: Weights & Biases, in **offline** mode unless you are logged in
  (``wandb login`` or ``WANDB_API_KEY``). Offline runs land in ``<log_dir>/wandb``;
  upload them later with ``wandb sync <log_dir>/wandb/offline-run-*``.
* ``"tensorboard"``: event files in ``<log_dir>/tensorboard``; view with
  ``tensorboard --logdir <log_dir>/tensorboard``.

No key or token is ever written to a log, a notebook or a report.
"""

from __future__ import annotations

import math
import netrc
import os
from pathlib import Path

BACKENDS = ("wandb", "tensorboard")


def wandb_logged_in() -> bool:
    """True if W&B credentials exist (environment or ~/.netrc). Never reads the key's value out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class Tracker:
    def __init__(self, run_name: str, config: dict | None = None, backends=(), log_dir=None, project="llm-training-lab"):
        unknown = set(backends) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown tracking backend(s) {sorted(unknown)}; choose from {BACKENDS}")
        self.run_name, self.history = run_name, []
        self.log_dir = Path(log_dir) if log_dir else None
        self._wandb = self._tb = None
        if backends and self.log_dir is None:
            raise ValueError("tracking backends need a log_dir to write to")
        if "wandb" in backends:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
            (self.log_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=project, name=run_name, config=config or {}, dir=str(self.log_dir), mode=mode,
                settings=wandb.Settings(silent=True, console="off"),
            )
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.log_dir / "tensorboard" / run_name))

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)

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
