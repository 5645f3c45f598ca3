"""The memory estimator: byte-exact against real objects, and sensible at 7B scale."""

import pytest
import torch

from course_utils.errors import ConfigError
from course_utils.lora import inject_lora
from course_utils.memory import (
    GIB, TrainingSetup, activation_bytes, estimate, fits, llama_7b, measure_activation_bytes,
    measure_model_state_bytes, nf4_bytes_per_weight,
)
from course_utils.model import count_parameters


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


def one_step(model, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return measure_model_state_bytes(model, opt)


def test_parameter_count_from_the_config_equals_the_model(make_model):
    for size in ({}, dict(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96)):
        model = make_model(**size)
        assert TrainingSetup.from_config(model.config).base_params() == count_parameters(model)


def test_full_fine_tuning_estimate_equals_measured_bytes(make_model):
    model = make_model()
    setup = TrainingSetup.from_config(model.config, optimizer="adamw")
    n = count_parameters(model)  # tied embedding counted once
    measured, est = one_step(model), estimate(setup)
    assert (est.weights, est.gradients, est.optimizer_states) == (
        measured["weights"], measured["gradients"], measured["optimizer_states"])
    assert measured["weights"] == 4 * n and measured["optimizer_states"] == 8 * n  # fp32: 4 + 4 + 8 bytes
    assert measured["optimizer_other"] == 4 * len(list(model.parameters()))  # AdamW's fp32 step counters


@pytest.mark.parametrize("targets,r", [("all-linear", 4), (("q_proj", "v_proj"), 2)])
def test_lora_estimate_equals_measured_bytes(make_model, targets, r):
    model = make_model()
    setup = TrainingSetup.from_config(model.config, lora_rank=r, lora_targets=targets)
    n = count_parameters(model)
    inject_lora(model, targets, r=r, alpha=2 * r)
    trainable = count_parameters(model, trainable_only=True)
    measured, est = one_step(model), estimate(setup)
    assert (est.weights, est.gradients, est.optimizer_states) == (
        measured["weights"], measured["gradients"], measured["optimizer_states"])
    assert setup.trainable_params() == trainable and measured["weights"] == 4 * (n + trainable)
    assert measured["gradients"] == 4 * trainable < 4 * n / 5  # only the adapters get gradients


def test_7b_full_fine_tuning_needs_about_16_bytes_per_parameter():
    setup = llama_7b(mixed_precision=True, optimizer="adamw")
    assert setup.base_params() == 6_738_415_616  # Llama-2-7B's published count
    est = estimate(setup)
    assert est.model_states == 16 * setup.base_params()  # 2 + 2 + 12 bytes
    assert 105e9 < est.model_states < 112e9
    assert not fits(setup, 24) and not fits(setup, 80)  # not even on one 80 GB GPU


def test_7b_qlora_fits_a_24_gib_gpu():
    qlora = llama_7b(mixed_precision=True, lora_rank=16, lora_targets="all-linear", quantization="nf4",
                     batch_size=1, seq_len=512, gradient_checkpointing=True)
    est = estimate(qlora)
    assert qlora.trainable_params() == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # ~40M adapters
    assert 3.3e9 < est.weights < 4.5e9  # 6.5B linear weights at ~0.52 byte + 16-bit embeddings + fp32 adapters
    assert est.total < 8 * GIB and fits(qlora, 24)
    assert nf4_bytes_per_weight(double_quant=True) * 8 == pytest.approx(4.127, abs=1e-3)
    # 16-bit LoRA without quantization also fits in 24 GiB, but full fine-tuning does not
    assert fits(llama_7b(mixed_precision=True, lora_rank=16, gradient_checkpointing=True), 24)


def test_zero_stages_reproduce_the_paper():
    """ZeRO paper, Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12)."""
    gb = [estimate(llama_7b(n_params=7_500_000_000, mixed_precision=True, zero_stage=s, dp_degree=64)).model_states
          / 1e9 for s in range(4)]
    assert gb == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)


def test_activations_grow_with_tokens_and_shrink_with_checkpointing():
    small = estimate(llama_7b(mixed_precision=True, seq_len=512)).activations
    assert estimate(llama_7b(mixed_precision=True, seq_len=1024)).activations == 2 * small
    ckpt = estimate(llama_7b(mixed_precision=True, seq_len=512, gradient_checkpointing=True)).activations
    assert ckpt < small / 5
    eager = estimate(llama_7b(mixed_precision=True, seq_len=512, flash_attention=False)).activations
    assert eager - small == 32 * 512 * 32 * 512 * 2  # layers × T × heads × T × 2 bytes of probabilities


@pytest.mark.parametrize("size", [{}, dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384)])
def test_activation_formula_matches_what_autograd_saves(make_model, size):
    model = make_model(**size)
    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    setup = TrainingSetup.from_config(model.config, batch_size=4, seq_len=48)
    assert activation_bytes(setup) == pytest.approx(measure_activation_bytes(model, ids), rel=0.06)
    # Checkpointing: the forward keeps only layer inputs (+ final norm and loss); the estimate adds
    # the one layer recomputed during backward, which a forward-only measurement cannot see.
    model.gradient_checkpointing_enable()
    model.train()
    one_layer = 4 * 48 * (9 * setup.hidden_size + 2 * setup.hidden_size + 4 * setup.intermediate_size) * 4
    ckpt = activation_bytes(TrainingSetup.from_config(model.config, batch_size=4, seq_len=48,
                                                      gradient_checkpointing=True))
    assert ckpt - one_layer == pytest.approx(measure_activation_bytes(model, ids), rel=0.03)


def test_optimizer_choices_change_only_the_optimizer_states():
    adam = estimate(llama_7b(optimizer="adamw"))
    sgd = estimate(llama_7b(optimizer="sgd"))
    eight = estimate(llama_7b(optimizer="adamw8bit"))
    assert sgd.optimizer_states == 0 and sgd.weights == adam.weights
    assert eight.optimizer_states < adam.optimizer_states / 3.5
    assert 0 < estimate(llama_7b(optimizer="adafactor")).optimizer_states < eight.optimizer_states


@pytest.mark.parametrize("kwargs,msg", [
    (dict(optimizer="lion"), "unknown optimizer 'lion'"),
    (dict(quantization="nf4"), "set lora_rank > 0"),
    (dict(zero_stage=4), "zero_stage must be 0, 1, 2 or 3"),
    (dict(quantization="int3"), "quantization must be"),
])
def test_bad_setups_raise_config_error(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        llama_7b(**kwargs)


def test_table_prints_every_part():
    text = str(estimate(llama_7b(mixed_precision=True)))
    for part in ("weights", "gradients", "optimizer states", "activations", "total", "GiB"):
        assert part in text
