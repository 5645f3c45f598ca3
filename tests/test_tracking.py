"""Chapter 11: one Tracker writes W&B (offline), TensorBoard and MLflow runs to a temporary folder, and each is read
back with the metric values, config and artifacts that were logged. No account, no network."""

import pytest

from course_utils import tracking

METRICS = [{"loss": 2.5, "lr": 1e-3}, {"loss": 1.75, "lr": 9e-4}, {"loss": 1.125, "lr": 5e-4}]
CONFIG = {"lr": 1e-3, "optimizer": "adamw", "model": {"layers": 2}}


@pytest.fixture
def logged(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    artifact = tmp_path / "notes.txt"
    artifact.write_text("kept with the run")
    runs = {}
    for name, scale in (("run-a", 1.0), ("run-b", 2.0)):
        t = tracking.Tracker(name, config={**CONFIG, "scale": scale}, backends=tracking.BACKENDS,
                             log_dir=tmp_path / "logs")
        for step, m in enumerate(METRICS):
            t.log({k: v * scale for k, v in m.items()}, step)
        t.log_artifact(artifact)
        t.finish()
        runs[name] = scale
    return tmp_path / "logs", runs


def _expected(key, scale):
    return [(step, m[key] * scale) for step, m in enumerate(METRICS)]


def _same(got, want):
    return [s for s, _ in got] == [s for s, _ in want] and \
        [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_tensorboard_reads_back_what_was_logged(logged):
    log_dir, runs = logged
    for name, scale in runs.items():
        got = tracking.read_tensorboard(log_dir, name)
        assert all(_same(got[key], _expected(key, scale)) for key in ("loss", "lr"))
        assert (log_dir / "tensorboard" / name / "notes.txt").read_text() == "kept with the run"


def test_mlflow_reads_back_metrics_params_and_artifacts(logged):
    from mlflow.tracking import MlflowClient

    log_dir, runs = logged
    got = tracking.read_mlflow(log_dir)
    assert set(got) == set(runs)
    for name, scale in runs.items():
        assert _same(got[name]["metrics"]["loss"], _expected("loss", scale))
        assert got[name]["params"]["optimizer"] == "adamw" and got[name]["params"]["model.layers"] == "2"
    client = MlflowClient(tracking.mlflow_uri(log_dir))
    run = client.search_runs([client.get_experiment_by_name("llm-training-lab").experiment_id])[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["notes.txt"]


def test_wandb_offline_runs_read_back_without_uploading(logged):
    log_dir, runs = logged
    offline = tracking.wandb_offline_runs(log_dir)
    assert len(offline) == 2
    seen = {}
    for run_dir in offline:
        got = tracking.read_wandb_offline(run_dir)
        seen[got["config"]["scale"]] = got
    for name, scale in runs.items():
        got = seen[scale]
        assert got["name"] == name
        assert _same(got["metrics"]["loss"], _expected("loss", scale))
        assert got["config"]["optimizer"] == "adamw"


def test_no_secret_is_written(tmp_path, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)  # as if logged in; WANDB_MODE keeps the run offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    t = tracking.Tracker("secret-check", config=CONFIG, backends=tracking.BACKENDS, log_dir=tmp_path)
    t.log(METRICS[0], 0)
    t.finish()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 3
    assert not [p for p in files if secret.encode() in p.read_bytes()]


def test_unknown_backend_and_missing_log_dir():
    with pytest.raises(ValueError, match="unknown tracking backend"):
        tracking.Tracker("x", backends=("clearml",), log_dir="x")
    with pytest.raises(ValueError, match="need a log_dir"):
        tracking.Tracker("x", backends=("mlflow",))
