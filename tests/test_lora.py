"""LoRA and adapters from scratch, proven equal to PEFT: outputs, gradients, merging, counts."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from course_utils.errors import ConfigError
from course_utils.lora import (
    BottleneckAdapter, LoRALinear, copy_lora_weights_to_peft, count_lora_parameters, inject_adapters,
    inject_lora, lora_layers, lora_state_dict, merge_lora, trainable_parameters, unmerge_lora,
)
from course_utils.model import count_parameters

ATTN = ["q_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


def randomize_b(model, seed=1):
    """B starts at zero, which would hide any bug in B's use or in A's gradient: make it nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def own_and_peft(make_model, targets, r=4, alpha=8):
    own = make_model(seed=0)
    torch.manual_seed(0)
    names = inject_lora(own, targets, r=r, alpha=alpha)
    randomize_b(own)
    peft = get_peft_model(make_model(seed=0), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    assert copy_lora_weights_to_peft(own, peft) == 2 * len(names)
    return own, peft, names


def logits_and_loss(model, ids):
    logits = model(input_ids=ids).logits  # (B, T, V)
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)  # a loss that touches every logit
    return logits, (logits * weights).sum() + logits.pow(2).mean()


@pytest.mark.parametrize("targets", [ATTN, "all-linear"])
def test_own_lora_equals_peft_outputs_and_gradients(make_model, targets):
    own, peft, names = own_and_peft(make_model, targets)
    ids = torch.randint(0, own.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    a, loss_a = logits_and_loss(own, ids)
    b, loss_b = logits_and_loss(peft, ids)
    assert (a - b).abs().max() < 1e-6
    loss_a.backward()
    loss_b.backward()
    peft_params = dict(peft.named_parameters())
    for name in names:
        layer = own.get_submodule(name)
        for part in ("lora_A", "lora_B"):
            ours = getattr(layer, part).grad
            theirs = peft_params[f"base_model.model.{name}.{part}.default.weight"].grad
            assert ours.abs().max() > 0, f"{name}.{part} got no gradient"
            assert (ours - theirs).abs().max() < 1e-6, f"{name}.{part}"
    # frozen base: no gradient reaches the original weights
    assert all(p.grad is None for n, p in own.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("targets,r", [(ATTN, 4), ("all-linear", 2), (["gate_proj", "down_proj", "k_proj"], 3)])
def test_trainable_counts_match_peft_and_the_formula(make_model, targets, r):
    own, peft, _ = own_and_peft(make_model, targets, r=r)
    peft_trainable, peft_total = peft.get_nb_trainable_parameters()
    assert trainable_parameters(own) == (peft_trainable, peft_total)
    assert count_lora_parameters(make_model(), targets, r) == peft_trainable  # from the built model's shapes
    assert count_lora_parameters(own.config, targets, r) == peft_trainable  # from the config alone
    assert peft_total == count_parameters(make_model()) + peft_trainable  # tied embedding counted once


def test_hand_computed_count():
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64)
    # per layer: q (32->32) 8*64, v (32->16, 1 KV head of dim 16) 8*48
    assert count_lora_parameters(cfg, ATTN, 8) == 2 * (8 * 64 + 8 * 48)


def test_merge_equals_unmerged_and_unmerge_restores(make_model):
    own, _, _ = own_and_peft(make_model, "all-linear")
    original = {n: p.detach().clone() for n, p in own.named_parameters()}
    ids = torch.randint(0, own.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = own(input_ids=ids).logits
        merge_lora(own)
        merge_lora(own)  # idempotent: a second merge must not add B @ A again
        merged = own(input_ids=ids).logits
    q = own.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.merged
    changed = q.base.weight - original["model.layers.0.self_attn.q_proj.base.weight"]
    assert torch.allclose(changed, q.delta_weight(), atol=1e-7)
    assert (merged - before).abs().max() < 1e-5
    unmerge_lora(own)
    for n, p in own.named_parameters():
        assert (p - original[n]).abs().max() < 1e-6, n
    with torch.no_grad():
        assert (own(input_ids=ids).logits - before).abs().max() < 1e-5


def test_lora_starts_as_the_base_model_and_state_dict_is_small(make_model):
    base, own = make_model(seed=0), make_model(seed=0)
    names = inject_lora(own, ATTN, r=4, alpha=8, dropout=0.1)
    own.eval()  # dropout off
    ids = torch.randint(0, own.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(own(input_ids=ids).logits, base(input_ids=ids).logits)  # B = 0
    sd = lora_state_dict(own)
    assert sorted(sd) == sorted(f"{n}.{p}" for n in names for p in ("lora_A", "lora_B"))
    assert sum(t.numel() for t in sd.values()) == trainable_parameters(own)[0]


def test_scaling_and_init_follow_the_paper():
    layer = LoRALinear(torch.nn.Linear(16, 8), r=4, alpha=16)
    assert layer.scaling == 4.0 and layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / 16 ** 0.5  # kaiming-uniform(a=sqrt(5)) bound = 1 / sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


@pytest.mark.parametrize("kwargs,msg", [
    (dict(targets=["nope_proj"]), r"target 'nope_proj' matches no nn.Linear.*q_proj"),
    (dict(targets=[]), "targets is empty"),
    (dict(r=0), "rank r must be a positive integer, got 0"),
    (dict(alpha=-1), "alpha must be positive"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
])
def test_bad_inputs_raise_config_error(make_model, kwargs, msg):
    args = dict(targets=ATTN, r=4, alpha=8) | kwargs
    with pytest.raises(ConfigError, match=msg):
        inject_lora(make_model(), **args)


def test_injecting_twice_is_caught(make_model):
    model = make_model()
    inject_lora(model, ATTN, r=2, alpha=2)
    with pytest.raises(ConfigError, match="already wrapped"):
        inject_lora(model, ATTN, r=2, alpha=2)


def test_adapters_start_as_identity_count_and_learn(make_model):
    base, model = make_model(seed=0), make_model(seed=0)
    names = inject_adapters(model, bottleneck=4)
    assert len(names) == 2 * model.config.num_hidden_layers
    h = model.config.hidden_size
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * model.config.num_hidden_layers * (2 * h * 4 + 4 + h)
    assert total == count_parameters(base) + trainable
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)  # zero-init up
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_adapter_rejects_bad_bottleneck():
    with pytest.raises(ConfigError, match="bottleneck must be a positive integer"):
        BottleneckAdapter(8, 0)
