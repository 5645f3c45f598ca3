"""What this machine has: library versions, devices, the profile in force (notebook 00 and ``llm-course env``)."""

from __future__ import annotations

import importlib
import os
import platform

LIBRARIES = ("torch", "transformers", "datasets", "tokenizers", "peft", "trl", "accelerate", "bitsandbytes",
             "matplotlib", "wandb", "tensorboard")


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # a broken optional library should not break the check
            out[name] = f"missing ({type(e).__name__})"
    return out


def device_summary() -> dict:
    import torch

    info = {"cpu_cores": os.cpu_count(), "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return info


def environment_report() -> str:
    from .profiles import get_profile, runs_dir

    p = get_profile()
    lines = [f"python {platform.python_version()} on {platform.system()} {platform.machine()}"]
    lines += [f"  {k:13s} {v}" for k, v in library_versions().items()]
    lines += [f"devices: {device_summary()}", f"profile in force: {p.name} — {p.description}", f"artifacts: {runs_dir(p)}"]
    return "\n".join(lines)
