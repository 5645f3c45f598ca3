"""course_utils.distributed: every strategy on 2 gloo processes reproduces the single-process losses; sharding
shows in the bytes each rank holds; a failing, dying or port-blocked launch is a clear error, not a hang."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict

import pytest

from course_utils import distributed as D
from course_utils.errors import ConfigError

CFG = D.DistConfig()


@pytest.fixture(scope="module")
def reference():
    return D.train_reference(CFG)


@pytest.fixture(scope="module")
def runs():
    """Each strategy once (2 processes each, a few seconds apiece), shared by the tests below."""
    return {name: D.run_strategy(name, CFG) for name in D.STRATEGIES}


@pytest.mark.parametrize("name", sorted(D.STRATEGIES))
def test_strategy_reproduces_the_single_process_losses(name, runs, reference):
    for rank_result in runs[name]:
        assert len(rank_result["losses"]) == CFG.steps
        assert max(abs(a - b) for a, b in zip(rank_result["losses"], reference["losses"])) < 1e-4, name
    first, last = reference["losses"][:5], reference["losses"][-5:]
    assert sum(last) < 0.8 * sum(first)  # and the run does learn


def test_sharding_shows_in_the_bytes_each_rank_holds(runs, reference):
    full = reference["optimizer_bytes"]
    ddp = runs["ddp"]
    assert all(r["optimizer_bytes"] == full and r["param_bytes"] == reference["param_bytes"] for r in ddp)
    for name in ("zero1", "fsdp", "tensor_parallel"):  # optimizer state split between the 2 ranks
        assert all(r["optimizer_bytes"] <= 0.55 * full for r in runs[name]), name
        assert sum(r["optimizer_bytes"] for r in runs[name]) == pytest.approx(full, rel=0.02), name
    assert all(r["param_bytes"] == reference["param_bytes"] for r in runs["zero1"])  # ZeRO-1: full weights
    assert all(r["param_bytes"] <= 0.55 * reference["param_bytes"] for r in runs["fsdp"])  # ZeRO-3: sharded
    pp = runs["pipeline_parallel"]  # layers split between the ranks: together exactly one model
    assert sum(r["param_bytes"] for r in pp) == reference["param_bytes"]


def test_1f1b_schedule_gives_the_same_losses(reference):
    out = D.launch(D.pipeline_parallel, 2, (asdict(CFG), "1f1b", 4))
    assert max(abs(a - b) for a, b in zip(out[0]["losses"], reference["losses"])) < 1e-4


def raises_on_rank_1(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom on purpose")
    return rank


def dies_on_rank_1(rank, world_size):
    if rank == 1:
        os._exit(3)  # no exception, no message: like a process killed for memory
    import torch.distributed as dist

    dist.barrier()  # rank 0 would wait here forever for rank 1


def test_a_failing_worker_is_named_with_its_traceback():
    with pytest.raises(D.LaunchError, match=r"rank 1 of 2 failed(.|\n)*boom on purpose"):
        D.launch(raises_on_rank_1, 2, timeout=60)


def test_a_dying_worker_stops_the_launch_instead_of_hanging():
    with pytest.raises(D.LaunchError, match="rank 1 exited with code 3"):
        D.launch(dies_on_rank_1, 2, timeout=60)


def test_a_port_in_use_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(D.LaunchError, match="already in use"):
            D.launch(raises_on_rank_1, 2, port=s.getsockname()[1])


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="divide"):
        D.run_strategy("ddp", D.DistConfig(batch=15))
    with pytest.raises(ConfigError, match="unknown strategy"):
        D.run_strategy("zero4")
