"""Parameter-efficient fine-tuning from scratch: LoRA and bottleneck adapters.

Full fine-tuning updates every weight ``W`` (out × in). LoRA (Hu et al., 2021)
freezes ``W`` and learns a low-rank *change* instead::

    h = W x + (alpha / r) · B A x          A: (r × in), B: (out × r), r ≪ min(in, out)

Only ``A`` and ``B`` are trained: ``r · (in + out)`` numbers per layer instead of
``in · out``. ``B`` starts at zero, so at step 0 the model is exactly the base
model; ``A`` starts random so that the first gradient of ``B`` is not zero.
After training, ``B A`` can be added into ``W`` (:meth:`LoRALinear.merge`): the
fine-tuned model then costs nothing extra at inference.

Bottleneck adapters (Houlsby et al., 2019) instead insert small new layers
(down-project, nonlinearity, up-project, residual) into the network. They also
start as the identity, but they sit *after* a nonlinearity, so they can never
be folded into the existing weights: they cost extra compute at inference.

Everything here is checked against PEFT in ``tests/test_lora.py`` (same
outputs, same gradients, same parameter counts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every nn.Linear except the output layer (lm_head)


# --------------------------------------------------------------------------- LoRA layer


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scaling · B @ A``.

    ``scaling = alpha / r`` keeps the size of the update roughly independent of the
    rank, so a learning rate tuned at one ``r`` still works at another.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        _check_lora_args(r, alpha, dropout)
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)
        # in/out features, not weight.shape: a 4-bit base layer stores its weight packed.
        in_f, out_f = base.in_features, base.out_features
        # Adapters train in fp32 even on a 16-bit (or 4-bit) base: tiny updates to
        # A and B would otherwise round away (PEFT does the same).
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=dtype, device=device))
        # kaiming-uniform with a=sqrt(5) is nn.Linear's default init, and PEFT's for A.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Dropout acts on the input of the LoRA path only; the frozen path sees clean x.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The update LoRA adds to the base weight: ``scaling · B @ A``, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:
            return out  # B @ A already lives inside base.weight; adding it again would count it twice
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r): the bottleneck
        return out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: ``W += scaling · B @ A`` (idempotent)."""
        if self.merged:
            return
        self._base_weight_or_raise().add_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to float rounding); training may continue afterwards."""
        if not self.merged:
            return
        self._base_weight_or_raise().sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False

    def _base_weight_or_raise(self) -> torch.Tensor:
        w = self.base.weight
        if not w.is_floating_point():
            raise ConfigError(
                "cannot merge LoRA into a quantized (integer-coded) base weight; dequantize the base "
                "model first, or keep the adapter separate"
            )
        return w.data

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _check_lora_args(r, alpha, dropout) -> None:
    if not isinstance(r, int) or r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
    if alpha <= 0:
        raise ConfigError(f"LoRA alpha must be positive (scaling = alpha / r), got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


# --------------------------------------------------------------------------- choosing layers


def _linear_names(model: nn.Module) -> list[str]:
    """Names of plain ``nn.Linear`` layers that LoRA may wrap (never the output layer)."""
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not out_layer and name.split(".")[-1] != "lm_head"
    ]


def _match(names: list[str], targets, wrapped: list[str] = ()) -> list[str]:
    """Names matching the target suffixes (PEFT's rule: the name is the target or ends in ``.target``)."""
    if not names:
        raise ConfigError("the model has no nn.Linear layer that LoRA could wrap")
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return list(names)
        targets = [targets]
    if not targets:
        raise ConfigError(f"targets is empty; pass module-name suffixes like ['q_proj', 'v_proj'] or {ALL_LINEAR!r}")
    chosen = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            if any(n == t or n.endswith("." + t) for n in wrapped):
                raise ConfigError(f"target {t!r} is already wrapped (LoRA or adapter injected twice?)")
            suffixes = sorted({n.split(".")[-1] for n in names})
            raise ConfigError(
                f"target {t!r} matches no nn.Linear in the model; linear layer names end in "
                f"{suffixes} (e.g. {names[0] if names else 'none'!r})"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap the targeted ``nn.Linear`` layers in :class:`LoRALinear`, in place; freeze everything else.

    ``targets`` is a list of module-name suffixes (``["q_proj", "v_proj"]``) or
    ``"all-linear"`` (every Linear but ``lm_head``). Returns the wrapped names.
    """
    _check_lora_args(r, alpha, dropout)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, AdaptedLinear))]
    names = _match(_linear_names(model), targets, wrapped)
    for p in model.parameters():
        p.requires_grad_(False)  # only A and B, created below, will train
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer into its base weight (for fast inference or export)."""
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the A and B matrices: the whole fine-tune in a few hundred KB instead of the full model."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit weights per byte; count the weights, not the bytes (as PEFT does).
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied/shared tensor is counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += _numel(p)
        trainable += _numel(p) if p.requires_grad else 0
    return trainable, total


# --------------------------------------------------------------------------- counting without building


def llama_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of every Linear in a Llama, read from its config.

    Works with a ``LlamaConfig`` or any object with the same attribute names, so the
    memory estimator can count a 7B model without allocating it.
    """
    h, n_layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    shapes = {}
    for i in range(n_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        shapes |= {
            f"{a}.q_proj": (h, heads * head_dim),
            f"{a}.k_proj": (h, kv_heads * head_dim),  # grouped-query attention: fewer K/V heads
            f"{a}.v_proj": (h, kv_heads * head_dim),
            f"{a}.o_proj": (heads * head_dim, h),
            f"{m}.gate_proj": (h, inter),
            f"{m}.up_proj": (h, inter),
            f"{m}.down_proj": (inter, h),
        }
    return shapes  # lm_head is left out: LoRA's "all-linear" never targets it


def count_lora_parameters(model_or_config, targets, r: int) -> int:
    """Predict LoRA's trainable parameters, ``sum of r · (in + out)`` over targeted layers, without building it."""
    _check_lora_args(r, 1.0, 0.0)
    if isinstance(model_or_config, nn.Module):
        mods = dict(model_or_config.named_modules())
        shapes = {n: (mods[n].in_features, mods[n].out_features) for n in _linear_names(model_or_config)}
    else:
        shapes = llama_linear_shapes(model_or_config)
    return sum(r * (shapes[n][0] + shapes[n][1]) for n in _match(list(shapes), targets))


# --------------------------------------------------------------------------- PEFT interop


def copy_lora_weights_to_peft(own_model: nn.Module, peft_model: nn.Module, adapter: str = "default") -> int:
    """Copy our A and B into a PEFT model wrapping the same base, so both compute the same function.

    Name mapping: ours ``<path>.lora_A`` -> PEFT ``base_model.model.<path>.lora_A.<adapter>.weight``
    (PEFT keeps A and B as bias-free ``nn.Linear`` layers, one per named adapter). Returns the number
    of tensors copied.
    """
    peft_params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for path, layer in lora_layers(own_model).items():
            for part in ("lora_A", "lora_B"):
                key = f"base_model.model.{path}.{part}.{adapter}.weight"
                if key not in peft_params:
                    raise ConfigError(f"PEFT model has no {key!r}; were both models given the same targets?")
                peft_params[key].copy_(getattr(layer, part))
                copied += 1
    return copied


# --------------------------------------------------------------------------- bottleneck adapters


class BottleneckAdapter(nn.Module):
    """Houlsby adapter: ``x + up(act(down(x)))``, a small residual MLP through a bottleneck.

    ``up`` starts at zero, so the adapter is the identity at init and fine-tuning starts
    from the base model. Parameters: ``2 · dim · bottleneck + bottleneck + dim``.

    Unlike LoRA, an adapter *cannot be merged*: the nonlinearity between ``down`` and
    ``up`` means ``adapter(W x)`` is not ``W' x`` for any matrix ``W'``, so the extra
    layers (and their latency) stay at inference.
    """

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        if bottleneck <= 0:
            raise ConfigError(f"adapter bottleneck must be a positive integer, got {bottleneck!r}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))  # (..., dim)


class AdaptedLinear(nn.Module):
    """A frozen Linear whose output goes through a :class:`BottleneckAdapter`."""

    def __init__(self, base: nn.Linear, bottleneck: int):
        super().__init__()
        self.base = base
        self.adapter = BottleneckAdapter(base.out_features, bottleneck).to(device=base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return self.adapter(out.to(self.adapter.up.weight.dtype)).to(out.dtype)


ADAPTER_TARGETS = ("self_attn.o_proj", "mlp.down_proj")  # end of the attention block, end of the MLP block


def inject_adapters(model: nn.Module, bottleneck: int) -> list[str]:
    """Add one adapter after the attention output and one after the MLP of every decoder layer.

    Wraps ``self_attn.o_proj`` and ``mlp.down_proj``: their outputs are exactly the two
    sub-block outputs, just before each residual add (Houlsby's placement). Freezes every
    other parameter. Returns the wrapped names.
    """
    names = _match(_linear_names(model), list(ADAPTER_TARGETS),
                   [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, AdaptedLinear))])
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _replace(model, name, AdaptedLinear(model.get_submodule(name), bottleneck))
    return names
