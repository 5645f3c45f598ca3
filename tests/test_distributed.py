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
    for name in ("zero1", "zero2", "fsdp", "tensor_parallel"):  # optimizer state split between the 2 ranks
        assert all(r["optimizer_bytes"] <= 0.55 * full for r in runs[name]), name
        assert sum(r["optimizer_bytes"] for r in runs[name]) == pytest.approx(full, rel=0.02), name
    assert all(r["param_bytes"] == reference["param_bytes"] for r in runs["zero1"])  # ZeRO-1: full weights
    assert all(r["param_bytes"] <= 0.55 * reference["param_bytes"] for r in runs["fsdp"])  # ZeRO-3: sharded
    for name in ("ddp_by_hand", "ddp", "zero1"):  # replicas stay bit-identical: same init, same averaged gradients
        assert runs[name][0]["weights_sha256"] == runs[name][1]["weights_sha256"], name
    assert runs["fsdp"][0]["weights_sha256"] != runs["fsdp"][1]["weights_sha256"]  # shards differ
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


def _torchrun(*args):
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.Popen([str(torchrun), *args, "-m", "course_utils.distributed", "--steps", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_json(proc, timeout=120):
    import json

    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_torchrun_runs_a_strategy_from_the_command_line():
    result = _last_json(_torchrun("--nproc-per-node", "2", "--master-port", str(D.free_port())))
    assert result["world_size"] == 2 and result["max_abs_diff_vs_one_process"] < 1e-4


def test_two_node_launch_rehearsed_on_one_machine():
    """Two launchers with node ranks 0 and 1 meet at one rendezvous on localhost, as two machines would."""
    port = str(D.free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    node1 = _torchrun(*common, "--node-rank", "1")
    node0 = _torchrun(*common, "--node-rank", "0")
    result = _last_json(node0)
    node1.communicate(timeout=60)
    assert node1.returncode == 0
    assert result["world_size"] == 2 and result["max_abs_diff_vs_one_process"] < 1e-4


def test_cluster_configs_are_valid_accelerate_configs():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    expected = {"accelerate_ddp.yaml": DistributedType.MULTI_GPU, "accelerate_fsdp.yaml": DistributedType.FSDP,
                "accelerate_deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
                "accelerate_deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
                "accelerate_multinode.yaml": DistributedType.FSDP}
    found = {p.name: p for p in Path("configs").glob("accelerate_*.yaml")}
    assert set(found) == set(expected)
    for name, kind in expected.items():
        cfg = ClusterConfig.from_yaml_file(found[name])  # raises on a key accelerate does not know
        assert cfg.distributed_type == kind, name
    assert ClusterConfig.from_yaml_file(found["accelerate_deepspeed_zero3.yaml"]).deepspeed_config["zero_stage"] == 3
    multi = ClusterConfig.from_yaml_file(found["accelerate_multinode.yaml"])
    assert multi.num_machines == 2 and multi.num_processes == 16
