import pytest

from course_utils import profiles
from course_utils.errors import ConfigError
from course_utils.pretrain import PretrainConfig


def test_env_variable_selects_profile(monkeypatch):
    monkeypatch.setattr(profiles, "_override", None)
    monkeypatch.setenv(profiles.ENV_VAR, "tiny")
    assert profiles.get_profile().name == "tiny"
    assert profiles.get_profile("smoke").name == "smoke"  # explicit name wins


def test_default_without_env_depends_on_cuda(monkeypatch):
    monkeypatch.setattr(profiles, "_override", None)
    monkeypatch.delenv(profiles.ENV_VAR, raising=False)
    monkeypatch.setattr(profiles, "_cuda_available", lambda: False)
    assert profiles.get_profile().name == "tiny"
    monkeypatch.setattr(profiles, "_cuda_available", lambda: True)
    assert profiles.get_profile().name == "gpu"


def test_use_profile_overrides_env_and_reaches_children(monkeypatch):
    monkeypatch.setattr(profiles, "_override", None)
    monkeypatch.setenv(profiles.ENV_VAR, "smoke")
    assert profiles.use_profile("tiny").name == "tiny"
    assert profiles.get_profile().name == "tiny"
    assert profiles.os.environ[profiles.ENV_VAR] == "tiny"  # subprocesses (accelerate, nbclient) inherit it


@pytest.mark.parametrize("bad", ["huge", "", "  "])
def test_unknown_profile_names_the_choices(monkeypatch, bad):
    monkeypatch.setattr(profiles, "_override", None)
    monkeypatch.setenv(profiles.ENV_VAR, bad or "nonsense")
    with pytest.raises(ConfigError, match="smoke, tiny, gpu"):
        profiles.get_profile()


def test_every_profile_has_a_valid_pretrain_config():
    for name in profiles.PROFILES:
        cfg = PretrainConfig.for_profile(name)
        cfg.validate()
        assert cfg.profile == name
        assert cfg.block_size <= profiles.PROFILES[name].model.context_length or name == "gpu"


def test_gpu_profile_resolves_without_cuda():
    """The gpu profile's CPU-checkable parts: real hub assets named, bf16 only where supported."""
    import torch

    from course_utils.training import resolve_precision

    gpu = profiles.get_profile("gpu")
    assert not gpu.offline and gpu.base_model.startswith("HuggingFaceTB/")
    assert set(gpu.hub_datasets) >= {"pretrain", "sft", "preference"}
    cfg = PretrainConfig.for_profile("gpu")
    assert (cfg.block_size, cfg.grad_accum, cfg.lr) == (512, 4, 1e-4)
    assert resolve_precision(cfg.precision, torch.device("cpu")) is None  # auto -> fp32 on CPU
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_runs_dir_is_per_profile(tmp_path, monkeypatch):
    monkeypatch.setenv(profiles.RUNS_ENV_VAR, str(tmp_path))
    assert profiles.runs_dir("tiny") == tmp_path / "tiny"
    assert profiles.runs_dir("smoke") == tmp_path / "smoke"


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="objective"):
        PretrainConfig.for_profile("smoke", objective="gpt").validate()
    with pytest.raises(ConfigError, match="warmup_steps"):
        PretrainConfig.for_profile("smoke", warmup_steps=100, max_steps=10).validate()
    with pytest.raises(ConfigError, match="batch_size"):
        PretrainConfig.for_profile("smoke", batch_size=0).validate()
