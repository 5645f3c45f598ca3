import pytest

from course_utils.errors import ConfigError
from course_utils.model import count_parameters, make_config
from course_utils.profiles import ModelSize, get_profile
from course_utils.tokenizer import load_tokenizer, save_tokenizer


def test_hidden_not_divisible_by_heads(tokenizer):
    with pytest.raises(ConfigError, match="hidden_size=30 is not divisible by num_heads=4"):
        make_config(ModelSize(30, 2, 4, 64, 64), tokenizer)


def test_odd_head_dim_rejected_for_rope(tokenizer):
    with pytest.raises(ConfigError, match="odd"):
        make_config(ModelSize(30, 2, 2, 64, 64), tokenizer)


def test_tokenizer_without_pad(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "t")
    t = load_tokenizer(tmp_path / "t")
    t.pad_token = None
    with pytest.raises(ConfigError, match="no pad token"):
        make_config(ModelSize(32, 2, 2, 64, 64), t)


def test_tiny_profile_model_is_about_one_million_parameters(tokenizer):
    from course_utils.model import build_model

    p = get_profile("tiny")
    cfg = make_config(p.model, tokenizer)
    cfg.vocab_size = p.tokenizer_vocab_size
    n = count_parameters(build_model(cfg))
    assert 0.8e6 < n < 1.3e6


def test_same_seed_same_weights(make_model):
    a, b, c = make_model(seed=1), make_model(seed=1), make_model(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all((sa[k] == sb[k]).all() for k in sa)
    assert any((sa[k] != sc[k]).any() for k in sa)
