"""Shared fixtures: everything is built in-process from the smoke profile; nothing touches the network."""

import os

import pytest

os.environ.setdefault("LLM_COURSE_PROFILE", "smoke")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["HF_HUB_OFFLINE"] = "1"  # any accidental hub access fails loudly instead of downloading


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    """Each test writes artifacts to its own temporary runs folder, never into the checkout."""
    monkeypatch.setenv("LLM_COURSE_RUNS", str(tmp_path / "runs"))


@pytest.fixture
def one_thread():
    """Run the test on one CPU thread (and restore the setting after); use with ``pytest.mark.usefixtures``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus():
    from course_utils.profiles import get_profile
    from course_utils.world import pretrain_corpus

    p = get_profile("smoke")
    return pretrain_corpus(p.seed, p.world.pretrain_docs, "train"), pretrain_corpus(p.seed, 24, "validation")


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from course_utils.tokenizer import train_tokenizer

    return train_tokenizer(corpus[0], 320)


@pytest.fixture(scope="session")
def packed(corpus, tokenizer):
    from course_utils.data import tokenize_and_pack

    return tokenize_and_pack(corpus[0], tokenizer, 32), tokenize_and_pack(corpus[1], tokenizer, 32)


@pytest.fixture
def make_model(tokenizer):
    from course_utils.model import build_model, make_config
    from course_utils.profiles import ModelSize

    def _make(seed=0, **size):
        dims = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=64) | size
        return build_model(make_config(ModelSize(**dims), tokenizer), seed=seed)

    return _make
