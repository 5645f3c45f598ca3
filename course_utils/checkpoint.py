"""Checkpoints: safetensors on disk, written atomically, verified on load.

A checkpoint folder holds everything needed to continue a run *exactly*:

=======================  =====================================================
``model.safetensors``    weights (+ ``config.json``), loadable by ``from_pretrained``
``optimizer.safetensors`` AdamW moment tensors; ``optimizer.json`` the rest
``rng.safetensors``      torch RNG states; ``trainer_state.json`` step, Python/NumPy RNG, metrics
``manifest.json``        size and SHA-256 of every file above
=======================  =====================================================

We never pickle (``torch.save``) anything: a pickle can run code when loaded,
safetensors and JSON cannot. Saving goes to a hidden temporary folder that is
renamed into place only when complete, so a crash mid-save never leaves a
half-written checkpoint where a loader would find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .io import write_json

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- optimizer state <-> flat tensors + JSON ----------------------------------------------------


def _split_optimizer_state(sd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": dict(sorted(state.items())), "param_groups": meta["param_groups"]}


# --- RNG ------------------------------------------------------------------------------------------


def parameters_digest(model) -> str:
    """A hash of every parameter's bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def capture_rng() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


@contextmanager
def quiet_transformers(errors_only: bool = False):
    """Hide transformers' per-shard progress bar while saving (one tiny shard is not news); with ``errors_only``
    also its warnings (e.g. the tied ``lm_head.weight`` reported missing when a Trainer reloads its best model)."""
    from transformers.utils import logging as hf_logging

    was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_on:
            hf_logging.enable_progress_bar()


# --- save / load ----------------------------------------------------------------------------------


def save_checkpoint(path, model, optimizer=None, step: int = 0, state: dict | None = None, tokenizer=None) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            tensors, meta = _split_optimizer_state(optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "optimizer.json", meta)
        rng_tensors, rng_meta = capture_rng()
        save_file(rng_tensors, tmp / "rng.safetensors")
        write_json(tmp / "trainer_state.json", {"step": step, "rng": rng_meta, **(state or {})})
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        write_json(tmp / MANIFEST, {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files})
        old = None
        if path.exists():  # move the previous version aside, then swap
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def verify_checkpoint(path) -> dict:
    """Check every file against the manifest; raise ``CheckpointError`` naming the first problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not (path / MANIFEST).exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete course checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / MANIFEST} is corrupt ({e.msg})") from None
    for name, info in manifest.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (size or SHA-256 differs from the manifest)")
    return manifest


def trainer_state(path) -> dict:
    """A verified checkpoint's ``trainer_state.json``: its step, RNG metadata and, for the course's loops, the
    logged ``history`` rows of the whole run."""
    verify_checkpoint(path)
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_checkpoint(path, model, optimizer=None, restore_rng_state: bool = True) -> dict:
    """Load weights (and optimizer / RNG state) into existing objects; return ``trainer_state.json``."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    weights = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied output weights are stored once; anything else missing is a real mismatch
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    real_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {real_missing[:3]}, unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    state = json.loads((path / "trainer_state.json").read_text())
    if optimizer is not None:
        if "optimizer.safetensors" not in manifest:
            raise CheckpointError(f"{path} holds no optimizer state; it cannot resume training")
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(_join_optimizer_state(load_file(path / "optimizer.safetensors"), meta))
    if restore_rng_state:
        restore_rng(load_file(path / "rng.safetensors"), state["rng"])
    return state


def latest_checkpoint(run_dir) -> Path | None:
    """The highest ``step_*`` folder under ``run_dir`` that has a manifest, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    steps = [p for p in run_dir.glob("step_*") if (p / MANIFEST).exists()]
    return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)
