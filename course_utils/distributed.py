"""Distributed training on one machine (chapter 08, 分布式训练): start N processes, then train the same model with
each strategy and compare with one process.

Every strategy here runs with the gloo backend on CPU, so a laptop can run them; on GPUs the same code runs with
NCCL (``backend="nccl"``) or through accelerate / DeepSpeed with the configs in ``configs/``.

* :func:`launch` -- start ``world_size`` worker processes on localhost, run ``fn(rank, world_size, *args)`` in
  each, return every rank's result; a worker that raises or dies, a port already taken, or a hang past the
  timeout becomes a :class:`LaunchError` that names the rank, instead of a notebook that never returns;
* :func:`train_reference` -- the single-process run every strategy is compared with;
* strategies, each a worker function for :func:`launch`: :func:`ddp_by_hand` (gradients averaged with an
  explicit all-reduce), :func:`ddp` (``DistributedDataParallel``), :func:`zero1`
  (``ZeroRedundancyOptimizer``: optimizer state sharded), :func:`zero2` and :func:`fsdp` (FSDP2 ``fully_shard``:
  gradients and optimizer state sharded; with ZeRO-3 the weights too, gathered per layer when used),
  :func:`tensor_parallel` (DTensor column/row-parallel linears), :func:`pipeline_parallel` (GPipe / 1F1B).

All of them train the same tiny MLP on the same data: the global batch of ``batch`` rows is split into
``world_size`` equal shards, so averaging the shards' gradients gives exactly the full batch's gradient and every
strategy must reach the single-process loss (to float rounding).
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, CourseError


class LaunchError(CourseError):
    """A worker process failed, died or hung; the message names the rank and carries its traceback."""


# --- launching -------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _worker(rank: int, world_size: int, port: int, backend: str, timeout: float, fn, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # N processes on a few cores: one thread each, or they fight over the cores
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        out = fn(rank, world_size, *args)
        dist.barrier()  # leave together: a rank that tears down its connections early can abort a slower peer
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world_size: int = 2, args: tuple = (), port: int | None = None, backend: str = "gloo",
           timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes; return the results by rank.

    ``fn`` must be importable (a module-level function: processes are *spawned*, not forked, so they do not
    inherit a half-initialised parent). For functions typed into a notebook cell, use accelerate's
    ``notebook_launcher``, which forks. ``port=None`` picks a free port.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    if port is None:
        port = free_port()
    elif port_in_use(port):
        raise LaunchError(f"port {port} on 127.0.0.1 is already in use (another run still going, or a process that "
                          "did not exit?); pass port=None to pick a free one")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, failures, waited = {}, [], 0.0
    try:
        while len(out) + len(failures) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue_mod.Empty:
                waited += 1.0
                reported = set(out) | {r for r, _ in failures}
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
                if dead and waited > 2.0:  # gone without a word (its last message had time to arrive)
                    raise LaunchError(f"{', '.join(f'rank {r} exited with code {c}' for r, c in dead)} without reporting "
                                      "a result or a Python error (killed? out of memory? run from a script without "
                                      "`if __name__ == \"__main__\":`?)") from None
                if waited >= timeout:
                    raise LaunchError(f"no result for {timeout:.0f} s from rank(s) {sorted(set(range(world_size)) - reported)}; "
                                      "a collective is probably waiting for a rank that never reaches it") from None
                continue
            if status == "ok":
                out[rank] = value
            else:
                failures.append((rank, value))
                break  # the other ranks may now wait forever in a collective: stop them
        if failures:
            rank, tb = failures[0]
            for p in procs:  # a rank that died silently is usually the cause of the others' errors: name it first
                p.join(timeout=1)
            silent = [(r, p.exitcode) for r, p in enumerate(procs)
                      if r not in out and r != rank and p.exitcode not in (None, 0)]
            cause = "".join(f"rank {r} exited with code {c} without a Python error (killed? out of memory?); then "
                            for r, c in silent)
            raise LaunchError(f"{cause}rank {rank} of {world_size} failed:\n{tb}")
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


# --- the model, the data, the reference run ------------------------------------------------------------


@dataclass
class DistConfig:
    dim: int = 32  # MLP width; divisible by the world size (tensor parallel splits it)
    hidden: int = 64
    layers: int = 4
    batch: int = 16  # global batch; each of N ranks takes batch / N rows
    steps: int = 20
    lr: float = 3e-3
    seed: int = 0

    def validate(self, world_size: int = 1) -> None:
        if min(self.dim, self.hidden, self.layers, self.batch, self.steps) < 1 or self.lr <= 0:
            raise ConfigError("dim, hidden, layers, batch, steps must be >= 1 and lr > 0")
        if self.batch % world_size or self.hidden % world_size:
            raise ConfigError(f"batch ({self.batch}) and hidden ({self.hidden}) must divide by the world size "
                              f"({world_size})")


class Block(nn.Module):
    """Residual MLP block: x + W2·gelu(W1·x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def make_model(cfg: DistConfig) -> nn.Sequential:
    """The same initial weights on every rank (seeded), so runs can be compared step by step."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # nn.Linear's own initialisation, seeded
        return nn.Sequential(*[Block(cfg.dim, cfg.hidden) for _ in range(cfg.layers)], nn.Linear(cfg.dim, 1))


def make_batches(cfg: DistConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``cfg.steps`` global batches (x, y) of a fixed regression task."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    w = torch.randn(cfg.dim, 1, generator=g)
    out = []
    for _ in range(cfg.steps):
        x = torch.randn(cfg.batch, cfg.dim, generator=g)
        out.append((x, torch.tanh(x @ w / cfg.dim**0.5)))
    return out


def shard(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s equal slice of the rows of ``t``."""
    n = t.size(0) // world_size
    return t[rank * n : (rank + 1) * n]


def _loss(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def train_reference(cfg: DistConfig) -> dict:
    """One process, the full batch: the losses every strategy must reproduce."""
    cfg.validate()
    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for x, y in make_batches(cfg):
        loss = _loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, **_bytes(model, opt)}


def _bytes(model, opt) -> dict:
    """Bytes this process holds for parameters, gradients and optimizer state (local shards only)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    import hashlib

    params = sum(local(p) for p in model.parameters())
    grads = sum(local(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    digest = hashlib.sha256()
    for p in model.parameters():
        t = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return {"param_bytes": params, "grad_bytes": grads, "optimizer_bytes": state,
            "weights_sha256": digest.hexdigest()[:16]}  # of this rank's (local) weights


def _global_loss(loss: torch.Tensor) -> float:
    """The full batch's loss from each rank's shard loss (equal shards: the mean of the means)."""
    t = loss.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).item()


# --- strategies (worker functions for launch) ----------------------------------------------------------


def _fit(model, opt, cfg: DistConfig, rank: int, world_size: int, sync_grads=None) -> list[float]:
    """The loop every data-parallel strategy shares: this rank's shard of each batch, backward, (``sync_grads``),
    step; returns the global loss of each step."""
    losses = []
    for x, y in make_batches(cfg):
        loss = _loss(model, shard(x, rank, world_size), shard(y, rank, world_size))
        opt.zero_grad()
        loss.backward()
        if sync_grads is not None:
            sync_grads()
        opt.step()
        losses.append(_global_loss(loss))
    return losses


def ddp_by_hand(rank: int, world_size: int, cfg_dict: dict) -> dict:
    """Data parallel written out: every rank a full model copy, its shard of the batch, then one all-reduce of
    each gradient (sum, ÷ N) before an identical optimizer step. This is all DDP does, minus the overlap."""
    cfg = DistConfig(**cfg_dict)
    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    def average_gradients():
        for p in model.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size

    losses = _fit(model, opt, cfg, rank, world_size, average_gradients)
    return {"losses": losses, **_bytes(model, opt)}


def ddp(rank: int, world_size: int, cfg_dict: dict) -> dict:
    """``DistributedDataParallel``: the same averaging, in buckets overlapped with the backward pass."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = DistConfig(**cfg_dict)
    model = DistributedDataParallel(make_model(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = _fit(model, opt, cfg, rank, world_size)
    return {"losses": losses, **_bytes(model.module, opt)}


def zero1(rank: int, world_size: int, cfg_dict: dict) -> dict:
    """ZeRO stage 1: DDP for the gradients, but each rank keeps the AdamW state of only its share of the
    parameters (``ZeroRedundancyOptimizer``), updates that share, and broadcasts it to the others."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    cfg = DistConfig(**cfg_dict)
    model = DistributedDataParallel(make_model(cfg))
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=cfg.lr)
    losses = _fit(model, opt, cfg, rank, world_size)
    return {"losses": losses, **_bytes(model.module, opt.optim)}


def _fully_sharded(rank: int, world_size: int, cfg_dict: dict, reshard_after_forward: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = DistConfig(**cfg_dict)
    mesh = init_device_mesh("cpu", (world_size,))
    model = make_model(cfg)
    for block in model:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = _fit(model, opt, cfg, rank, world_size)
    return {"losses": losses, **_bytes(model, opt)}


def fsdp(rank: int, world_size: int, cfg_dict: dict) -> dict:
    """FSDP2 (``fully_shard``, ZeRO stage 3): every parameter is split across ranks (a DTensor); a layer's full
    weights are all-gathered just before its forward/backward and freed after; gradients are reduce-scattered,
    so each rank also holds only its shard of the gradients and of the AdamW state."""
    return _fully_sharded(rank, world_size, cfg_dict, reshard_after_forward=True)


def zero2(rank: int, world_size: int, cfg_dict: dict) -> dict:
    """ZeRO stage 2 with FSDP2: ``reshard_after_forward=False`` keeps each layer's gathered weights from the forward
    pass until its backward (no second all-gather), while gradients and optimizer state stay sharded. More memory
    during the step than stage 3, less communication; between steps the weights are sharded as in FSDP."""
    return _fully_sharded(rank, world_size, cfg_dict, reshard_after_forward=False)


def tensor_parallel(rank: int, world_size: int, cfg_dict: dict) -> dict:
    """Tensor parallel (Megatron style) with DTensor: in each block ``up`` is split by output columns
    (``ColwiseParallel``: each rank computes half of the hidden units) and ``down`` by input rows
    (``RowwiseParallel``: each rank multiplies its half, then one all-reduce sums the partial outputs). Every rank
    sees the whole batch; the weights, their gradients and their AdamW state are halved."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = DistConfig(**cfg_dict)
    mesh = init_device_mesh("cpu", (world_size,))
    model = make_model(cfg)
    for block in list(model)[:-1]:
        parallelize_module(block, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, foreach=False)
    losses = []
    for x, y in make_batches(cfg):
        loss = _loss(model, x, y)  # the full batch on every rank: the loss is already the global one
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, **_bytes(model, opt)}


def pipeline_parallel(rank: int, world_size: int, cfg_dict: dict, schedule: str = "gpipe",
                      microbatches: int = 4) -> dict:
    """Pipeline parallel with ``torch.distributed.pipelining``: rank r holds a contiguous slice of the layers
    (the last rank also the head); the batch is cut into micro-batches that flow through the stages, GPipe (all
    forwards, then all backwards) or 1F1B (one forward, one backward, in turn). Gradients are averaged over the
    micro-batches, so the update equals the full batch's."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    cfg = DistConfig(**cfg_dict)
    layers = list(make_model(cfg))
    per = -(-len(layers) // world_size)
    part = nn.Sequential(*layers[rank * per : (rank + 1) * per])
    stage = PipelineStage(part, rank, world_size, torch.device("cpu"))
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = kind(stage, n_microbatches=microbatches, loss_fn=torch.nn.functional.mse_loss)
    opt = torch.optim.AdamW(part.parameters(), lr=cfg.lr)
    losses, last = [], rank == world_size - 1
    for x, y in make_batches(cfg):
        opt.zero_grad()
        mb_losses = []
        if rank == 0:
            sched.step(x)
        elif last:
            sched.step(target=y, losses=mb_losses)
        else:
            sched.step()
        opt.step()
        loss = torch.stack(mb_losses).mean() if last else torch.zeros(())
        dist.broadcast(loss, src=world_size - 1)  # equal micro-batches: the mean of their means
        losses.append(loss.item())
    return {"losses": losses, **_bytes(part, opt)}


STRATEGIES = {"ddp_by_hand": ddp_by_hand, "ddp": ddp, "zero1": zero1, "zero2": zero2, "fsdp": fsdp,
              "tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel}


def run_strategy(name: str, cfg: DistConfig | None = None, world_size: int = 2, timeout: float = 120.0) -> list[dict]:
    """Launch one strategy on ``world_size`` processes; returns each rank's losses and bytes."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    cfg = cfg or DistConfig()
    cfg.validate(world_size)
    return launch(STRATEGIES[name], world_size, (asdict(cfg),), timeout=timeout)


# --- the same strategies under torchrun / accelerate launch ----------------------------------------------


def main(argv=None) -> int:
    """``torchrun --nproc-per-node 2 -m course_utils.distributed --strategy ddp`` (or ``accelerate launch``): the
    launcher starts the processes and sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; each process runs one
    strategy and rank 0 prints the result as JSON next to the single-process losses."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m course_utils.distributed", description=main.__doc__)
    parser.add_argument("--strategy", choices=list(STRATEGIES), default="ddp")
    parser.add_argument("--steps", type=int, default=DistConfig.steps)
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPUs)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("run this under a launcher that sets RANK and WORLD_SIZE, e.g. "
                         "`torchrun --nproc-per-node 2 -m course_utils.distributed`")
    cfg = DistConfig(steps=args.steps)
    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        cfg.validate(world_size)
        out = STRATEGIES[args.strategy](rank, world_size, asdict(cfg))
        if rank == 0:
            ref = train_reference(cfg)["losses"]
            print(json.dumps({"strategy": args.strategy, "world_size": world_size, "losses": out["losses"],
                              "max_abs_diff_vs_one_process": max(abs(a - b) for a, b in zip(out["losses"], ref)),
                              **{k: v for k, v in out.items() if k != "losses"}}))
        dist.barrier()  # leave together (see _worker)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
