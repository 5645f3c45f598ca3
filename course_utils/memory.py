"""Where the memory of a training run goes, estimated before you run it and measured after.

Training memory has four parts:

==================  ===========================================================
weights             every parameter, trainable or frozen (4-bit for QLoRA's base)
gradients           one per *trainable* parameter
optimizer states    AdamW keeps two running averages per trainable parameter; with
                    mixed precision it also keeps an fp32 master copy of the weights
activations         what the forward pass saves for the backward pass; grows with
                    batch × sequence length, shrinks with gradient checkpointing
==================  ===========================================================

The first three are the *model states*. For mixed-precision AdamW the ZeRO paper
(Rajbhandari et al., 2020) counts them as ``2Ψ + 2Ψ + 12Ψ = 16Ψ`` bytes for Ψ
parameters (16-bit weights, 16-bit gradients, fp32 master weights + momentum +
variance): a 7B model needs ~110 GB before a single activation. ZeRO stage 1, 2, 3
split the optimizer states, then the gradients, then the weights across the
data-parallel GPUs. LoRA shrinks gradients and optimizer states to the adapters;
QLoRA also stores the frozen weights in 4 bits.

:func:`estimate` predicts the four parts from a :class:`TrainingSetup`;
:func:`measure_model_state_bytes` counts the model states of real objects.
``tests/test_memory.py`` checks the two agree to the byte on the course model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch

from .errors import ConfigError
from .lora import count_lora_parameters, llama_linear_shapes

GIB = 2**30

# Optimizer-state bytes per trainable parameter, not counting an fp32 master copy.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,  # momentum + variance, fp32 each
    "adamw8bit": 2.0 + 8 / 256,  # both in uint8, plus one fp32 scale per 256 values for each
    "sgd": 0.0,  # plain SGD keeps nothing
    "sgd_momentum": 4.0,  # one fp32 momentum buffer
    "adafactor": None,  # factored variance: see _optimizer_bytes_per_param
}


@dataclass
class TrainingSetup:
    """Everything that decides training memory on one GPU. Sizes are per GPU (micro-batch)."""

    # model: a Llama-style decoder (from_config / llama_7b fill these in)
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    n_params: int | None = None  # total parameters; None = counted from the shapes above
    # precision and optimizer
    mixed_precision: bool = False  # True: 16-bit weights, grads, activations + fp32 master weights
    optimizer: str = "adamw"  # one of OPTIMIZER_STATE_BYTES
    # parameter-efficient fine-tuning
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_targets: str | tuple = "all-linear"  # module-name suffixes, as for lora.inject_lora
    quantization: str = "none"  # "nf4": frozen Linear weights in 4 bits (QLoRA); needs lora_rank > 0
    double_quant: bool = True  # NF4 absmax stored in 8 bits (0.127 instead of 0.5 extra bits/weight)
    # activations
    batch_size: int = 1  # sequences per GPU per forward pass
    seq_len: int = 512
    gradient_checkpointing: bool = False  # keep only each layer's input; recompute the rest in backward
    flash_attention: bool = True  # SDPA/flash: the (heads × T × T) attention matrix is never stored
    # distributed
    zero_stage: int = 0  # 0: replicate everything; 1: shard optimizer; 2: + grads; 3: + weights
    dp_degree: int = 1  # data-parallel GPUs sharing the ZeRO shards

    def __post_init__(self):
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_STATE_BYTES)}")
        if self.quantization not in ("none", "nf4"):
            raise ConfigError(f"quantization must be 'none' or 'nf4', got {self.quantization!r}")
        if self.quantization == "nf4" and self.lora_rank <= 0:
            raise ConfigError("quantization='nf4' freezes the base weights in 4 bits; train LoRA adapters on top "
                              "(set lora_rank > 0): 4-bit weights themselves cannot be trained")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.dp_degree < 1 or self.batch_size < 1 or self.seq_len < 1 or self.lora_rank < 0:
            raise ConfigError("dp_degree, batch_size and seq_len must be >= 1 and lora_rank >= 0")

    @classmethod
    def from_config(cls, config, **overrides) -> TrainingSetup:
        """Read the architecture from a transformers ``LlamaConfig`` (or any config with its names)."""
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            num_kv_heads=getattr(config, "num_key_value_heads", None),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            **overrides,
        )

    # -- parameter counts -----------------------------------------------------------------

    def _shape_config(self) -> SimpleNamespace:
        """The attribute names lora.llama_linear_shapes expects."""
        return SimpleNamespace(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                               num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                               intermediate_size=self.intermediate_size)

    def linear_params(self) -> int:
        """Weights of the Linear layers inside the decoder layers (what LoRA targets, NF4 quantizes)."""
        return sum(i * o for i, o in llama_linear_shapes(self._shape_config()).values())

    def base_params(self) -> int:
        if self.n_params is not None:
            return self.n_params
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden_size  # two RMSNorms per layer + the final one
        return self.linear_params() + embeddings + norms

    def trainable_params(self) -> int:
        if self.lora_rank == 0:
            return self.base_params()
        return count_lora_parameters(self._shape_config(), self.lora_targets, self.lora_rank)


@dataclass
class Breakdown:
    """Bytes per GPU, by part."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer_states

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer states", self.optimizer_states), ("activations", self.activations),
                ("total", self.total)]
        # GiB (2**30) is what GPU tools report; papers usually quote GB (10**9).
        lines = [f"{name:<18}{b / GIB:>10.2f} GiB{b / 1e9:>10.2f} GB" for name, b in rows]
        lines.insert(-1, "-" * 45)
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    __str__ = table


def _optimizer_bytes_per_param(setup: TrainingSetup) -> float:
    per = OPTIMIZER_STATE_BYTES[setup.optimizer]
    if per is None:
        # Adafactor (no momentum) keeps one fp32 row mean and one column mean per (out × in)
        # matrix: (out + in) numbers for out·in weights, about 2 / hidden_size per weight.
        per = 4 * 2 / setup.hidden_size
    return per


def nf4_bytes_per_weight(double_quant: bool = True, blocksize: int = 64) -> float:
    """0.5 byte of code + the block's absmax shared by ``blocksize`` weights (fp32, or 8-bit
    with one fp32 scale per 256 blocks under double quantization)."""
    absmax = (1 + 4 / 256) if double_quant else 4
    return 0.5 + absmax / blocksize


def activation_bytes(setup: TrainingSetup) -> int:
    """Approximate activations saved for backward, in bytes (a documented model, not a measurement).

    Count, per token and decoder layer, the tensors a transformers Llama keeps for the
    backward pass, in the compute dtype (2 bytes with mixed precision, else 4):

    - attention block: RMSNorm input, normalized input (for the norm's weight gradient)
      and output (3h); rotated Q and K, and V (h + 2·kv); the attention output and its
      reshaped copy fed to o_proj (2h)
    - MLP block: RMSNorm input, normalized, output (3h); gate, SiLU(gate), up, and their
      product fed to down_proj (4·I)

    That is ``9h + 2·kv + 4·I`` numbers, plus ``heads × T`` attention probabilities unless
    flash/SDPA attention recomputes them. With gradient checkpointing only each layer's input
    (h) is kept, plus one layer's full set while it is recomputed during backward. After the
    layers, the final RMSNorm keeps 3h per token and the loss keeps fp32 log-probabilities,
    ``B × T × V × 4`` bytes. Ignored: LoRA's rank-r intermediates,
    rotary tables, temporary buffers. :func:`measure_activation_bytes` checks this on a real model.
    """
    e = 2 if setup.mixed_precision else 4
    h, inter = setup.hidden_size, setup.intermediate_size
    kv = (setup.num_kv_heads or setup.num_heads) * (h // setup.num_heads)
    per_token_layer = 9 * h + 2 * kv + 4 * inter + (0 if setup.flash_attention else setup.num_heads * setup.seq_len)
    tokens = setup.batch_size * setup.seq_len
    if setup.gradient_checkpointing:
        layers = tokens * (setup.num_layers * h + per_token_layer)
    else:
        layers = tokens * setup.num_layers * per_token_layer
    return int((layers + tokens * 3 * h) * e + tokens * setup.vocab_size * 4)


def estimate(setup: TrainingSetup) -> Breakdown:
    """Predict the per-GPU memory of one training step (see the module docstring)."""
    n, trainable = setup.base_params(), setup.trainable_params()
    w16 = 2 if setup.mixed_precision else 4  # bytes of a stored weight or gradient
    opt_per = _optimizer_bytes_per_param(setup)
    notes = []
    if setup.lora_rank:
        if setup.quantization == "nf4":
            linear = setup.linear_params()
            weights = linear * nf4_bytes_per_weight(setup.double_quant) + (n - linear) * w16
        else:
            weights = n * w16
        # Adapters live in fp32 even next to 16-bit or 4-bit weights (PEFT's default), so they
        # need no separate master copy.
        weights += trainable * 4
        grads, opt = trainable * 4, trainable * opt_per
    else:
        weights, grads = n * w16, n * w16
        master = 4 if setup.mixed_precision else 0  # fp32 copy the optimizer updates
        opt = n * (master + opt_per)
    if setup.zero_stage:
        d = setup.dp_degree
        opt /= d
        grads = grads / d if setup.zero_stage >= 2 else grads
        weights = weights / d if setup.zero_stage >= 3 else weights
        notes.append(f"ZeRO-{setup.zero_stage} over {d} GPUs: shards only; communication buffers not counted")
    notes.append("not counted: CUDA context, allocator fragmentation, temporary buffers")
    return Breakdown(int(math.ceil(weights)), int(math.ceil(grads)), int(math.ceil(opt)),
                     activation_bytes(setup), notes)


def fits(setup: TrainingSetup, gpu_gib: float, reserve_gib: float = 1.0) -> bool:
    """Does the estimate fit on a ``gpu_gib`` GPU, keeping ``reserve_gib`` for the CUDA context
    and allocator fragmentation?"""
    return estimate(setup).total / GIB + reserve_gib <= gpu_gib


def llama_7b(**overrides) -> TrainingSetup:
    """Llama(-2) 7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000, untied (6.74B parameters)."""
    base = TrainingSetup(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008, vocab_size=32000)
    return replace(base, **overrides)


# --------------------------------------------------------------------------- measuring


def stored_bytes(t: torch.Tensor) -> int:
    size = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: codes + absmax and code tables
    if state is not None:
        from .quant import quant_state_bytes

        size += quant_state_bytes(state)
    return size


def measure_model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes the model states really take, after at least one ``optimizer.step()``.

    ``optimizer_states`` counts the per-element buffers (AdamW's momentum and variance);
    ``optimizer_other`` the small rest (step counters, 8-bit scales and code tables).
    Tied parameters are counted once.
    """
    params = {id(p): p for p in model.parameters()}  # dict by id: a shared tensor once
    weights = sum(stored_bytes(p) for p in params.values())
    grads = sum(stored_bytes(p.grad) for p in params.values() if p.grad is not None)
    states = other = 0
    if not optimizer.state:
        raise ConfigError("the optimizer has no state yet; call optimizer.step() once before measuring")
    for param, state in optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                if value.numel() == param.numel():
                    states += stored_bytes(value)
                else:
                    other += stored_bytes(value)
    return {"weights": weights, "gradients": grads, "optimizer_states": states, "optimizer_other": other}


def measure_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during one forward pass with a loss.

    A ``saved_tensors_hooks`` pair sees every tensor the moment autograd stores it; we add up
    each distinct storage once and skip the parameters (they are weights, not activations).
    Recomputation under gradient checkpointing happens in backward and is not seen here.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, labels=input_ids)
    return sum(seen.values())
