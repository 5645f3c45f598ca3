"""4-bit NormalFloat (NF4) quantization from scratch, and QLoRA-style 4-bit loading.

QLoRA (Dettmers et al., 2023) stores each frozen base weight in 4 bits:

1. Cut the flattened weight into blocks of 64 numbers.
2. Divide each block by its largest absolute value (its *absmax*), so it lies in [-1, 1].
3. Replace every number by the index (0..15) of the nearest of 16 fixed *code values*.

The 16 NF4 code values are quantiles of a standard normal distribution: trained
weights are roughly normal, so every code is used about equally often, which is
what makes 4 bits go as far as they can. Two indices share one byte.

Storage per weight: 4 bits + 32 bits / 64 for the fp32 absmax = 4.5 bits.
*Double quantization* stores the absmax values themselves in 8 bits (blocks of 256),
bringing the overhead from 0.5 to about 0.127 bits per weight.

At compute time the weight is dequantized block by block (code value × absmax)
into the compute dtype; gradients flow only into LoRA adapters on top (chapter 04).
``tests/test_quant.py`` checks this file against bitsandbytes.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


def _nf4_code() -> torch.Tensor:
    """The 16 NF4 values, built from normal quantiles as in the QLoRA paper (appendix E).

    Take 8 evenly spaced probabilities from ``delta`` down to 0.5 for the positive side and
    7 for the negative side, map them through the inverse normal CDF, add an exact zero
    (so zero-padding and zero weights are represented exactly), and scale to [-1, 1].
    The asymmetry (8 positive, 7 negative, one zero) spends all 16 codes.
    ``delta = 1 - (1/32 + 1/30) / 2 ≈ 0.9677``, rounded to 0.9677083 as the reference
    implementation does; the probability grid is float32 like there, so the table below
    equals bitsandbytes' bit for bit.
    """
    delta = 0.9677083
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9)[:-1].double())  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8)[:-1].double())  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


NF4_CODE = _nf4_code()  # (16,) sorted: -1.0, -0.696, ..., 0.0, ..., 0.723, 1.0
ZERO_CODE = 7  # NF4_CODE[7] == 0.0


# --------------------------------------------------------------------------- packing


def pack_4bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' layout)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=pad_code)  # an odd count leaves the last low nibble unused
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: ``n`` codes as int64 indices."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()


# --------------------------------------------------------------------------- double quantization


@dataclass
class QuantizedAbsmax:
    """The per-block absmax values stored in 8 bits (QLoRA's "double quantization").

    The absmax values are all positive and similar in size, so we subtract their mean
    first (``offset``) and then quantize the remainder blockwise (256 per block) to int8
    with one fp32 scale per block. (bitsandbytes uses a non-linear 8-bit float code here;
    a linear int8 code is simpler and about as accurate for these well-behaved numbers.)
    """

    codes: torch.Tensor  # (n_blocks,) int8
    scale: torch.Tensor  # (n_groups,) fp32, absmax of each group of `blocksize` centred values
    offset: float  # mean absmax, removed before quantizing
    blocksize: int = 256

    @classmethod
    def quantize(cls, absmax: torch.Tensor, blocksize: int = 256) -> QuantizedAbsmax:
        offset = absmax.mean().item()
        centred, n = absmax - offset, absmax.numel()
        groups = F.pad(centred, (0, -n % blocksize)).view(-1, blocksize)  # (n_groups, 256)
        scale = groups.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round(groups / scale[:, None] * 127).to(torch.int8).reshape(-1)[:n]
        return cls(codes, scale, offset, blocksize)

    def dequantize(self) -> torch.Tensor:
        n = self.codes.numel()
        groups = F.pad(self.codes.float(), (0, -n % self.blocksize)).view(-1, self.blocksize)
        return (groups / 127 * self.scale[:, None]).reshape(-1)[:n] + self.offset

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel() + 4  # int8 codes + fp32 scales + fp32 offset


# --------------------------------------------------------------------------- NF4


@dataclass
class NF4Weight:
    """A weight stored in NF4: packed codes, one scale per block, and the original shape."""

    packed: torch.Tensor  # (ceil(n / 2),) uint8, two codes per byte
    absmax: torch.Tensor | QuantizedAbsmax  # (n_blocks,) fp32, or 8-bit with double quantization
    shape: torch.Size
    blocksize: int = 64
    dtype: torch.dtype = torch.float32  # dtype to dequantize into

    def block_scales(self) -> torch.Tensor:
        return self.absmax.dequantize() if isinstance(self.absmax, QuantizedAbsmax) else self.absmax

    def codes(self) -> torch.Tensor:
        return unpack_4bit(self.packed, math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        scales = self.absmax.nbytes if isinstance(self.absmax, QuantizedAbsmax) else 4 * self.absmax.numel()
        return self.packed.numel() + scales


def _nearest_code(x: torch.Tensor, chunk: int = 2**20) -> torch.Tensor:
    """Index of the nearest NF4 value for each number in ``x`` (an exact tie goes to the lower code).

    The plain way: measure the distance to all 16 values and take the smallest. That builds a
    16-times-larger table, so large weights go through in chunks.
    """
    code = NF4_CODE.to(x.device)
    return torch.cat([(part.unsqueeze(-1) - code).abs().argmin(dim=-1) for part in x.split(chunk)])


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Blockwise absmax quantization of ``w`` to the 16 NF4 values (see the module docstring)."""
    if blocksize <= 0:
        raise ConfigError(f"blocksize must be positive, got {blocksize}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    # Zero-padding the last, partial block leaves its absmax unchanged.
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    codes = _nearest_code(scaled.reshape(-1))  # (n_blocks * blocksize,)
    stored_absmax = QuantizedAbsmax.quantize(absmax) if double_quant else absmax
    packed = pack_4bit(codes[:n], pad_code=ZERO_CODE)  # a spare nibble encodes 0.0
    return NF4Weight(packed, stored_absmax, w.shape, blocksize, w.dtype)


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """Code value × block absmax, reshaped back: the weight the 4-bit layer computes with."""
    n = math.prod(q.shape)
    values = NF4_CODE.to(q.packed.device)[q.codes()]  # (n,) in [-1, 1]
    blocks = F.pad(values, (0, -n % q.blocksize)).view(-1, q.blocksize) * q.block_scales()[:, None]
    return blocks.reshape(-1)[:n].reshape(q.shape).to(q.dtype)


def quantization_error(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> dict:
    """How much NF4 changes ``w``: max/mean absolute error, the max error relative to its
    block's absmax, and the storage cost in bits per weight."""
    q = quantize_nf4(w, blocksize, double_quant)
    err = (dequantize_nf4(q).float() - w.float()).reshape(-1)
    n = err.numel()
    absmax = F.pad(w.detach().float().reshape(-1).abs(), (0, -n % blocksize)).view(-1, blocksize).amax(1)
    per_elem_absmax = absmax.repeat_interleave(blocksize)[:n]
    return {
        "max_abs": err.abs().max().item(),
        "mean_abs": err.abs().mean().item(),
        "max_rel_to_absmax": (err.abs() / per_elem_absmax.clamp_min(1e-30)).max().item(),
        "bits_per_weight": 8 * q.nbytes / n,
    }


# --------------------------------------------------------------------------- bitsandbytes


@lru_cache(maxsize=None)
def bnb_4bit_available(device: str = "cpu") -> tuple[bool, str]:
    """``(ok, reason)``: can bitsandbytes quantize and dequantize 4-bit weights on ``device``?"""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except Exception as e:  # not installed, or its native library fails to load
        return False, f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
    try:
        w = torch.linspace(-1, 1, 128, device=device).reshape(2, 64)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        back = bnbf.dequantize_4bit(packed, state)
        if (back - w).abs().max().item() > 0.2:
            return False, f"bitsandbytes {bitsandbytes.__version__} 4-bit round trip on {device} gave wrong values"
    except Exception as e:
        return False, f"bitsandbytes {bitsandbytes.__version__} cannot run 4-bit on {device} ({type(e).__name__}: {e})"
    return True, f"bitsandbytes {bitsandbytes.__version__}: 4-bit NF4 works on {device}"


def load_4bit(model_dir_or_model_fn, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
              device_map: str = "cpu"):
    """Load a course model with its Linear layers in NF4 (QLoRA's base model), via transformers.

    ``model_dir_or_model_fn`` is a folder written by ``save_pretrained``, a hub id such as
    ``"HuggingFaceTB/SmolLM2-135M"`` (downloaded once), a model object, or a function returning
    one (objects are saved to a temporary folder first: transformers quantizes while loading).
    Embeddings, norms and the tied ``lm_head`` stay in ``compute_dtype``; every other Linear
    becomes a bitsandbytes ``Linear4bit``.
    """
    ok, why = bnb_4bit_available(device_map)
    if not ok:
        raise ConfigError(f"4-bit loading needs a working bitsandbytes: {why}. "
                          "Install it with `pip install bitsandbytes`, or skip the QLoRA part of chapter 04.")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = model_dir_or_model_fn
    if isinstance(source, nn.Module) or callable(source):
        model = source if isinstance(source, nn.Module) else source()
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            return load_4bit(folder, compute_dtype, double_quant, device_map)
    folder = Path(source)
    hub_id = isinstance(source, str) and not folder.exists() and source.count("/") == 1
    if not hub_id and not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a saved model folder (no config.json) nor a hub id (owner/name); "
                          "write one with model.save_pretrained(folder)")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,  # weights are dequantized to this for each matmul
    )
    model = AutoModelForCausalLM.from_pretrained(source if hub_id else folder, quantization_config=config,
                                                 device_map=device_map, dtype=compute_dtype, trust_remote_code=False)
    if device_map == "cpu":
        _warn_on_bad_cpu_layers(model)
        _no_bf16_repacking(model)
    return model


def _no_bf16_repacking(model) -> None:
    """Keep bitsandbytes' CPU layers on the path that dequantizes to ``compute_dtype``.

    On CPUs with AVX512-BF16, ``Linear4bit`` in eval mode without gradients otherwise repacks its codes into
    another layout (for good: the stored codes change) and multiplies in bf16, so logits differ from the
    dequantized fp32 weights by ~5e-3 and the chapter's code-by-code comparisons would depend on the CPU.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@lru_cache(maxsize=None)
def bnb_cpu_dequant_matches(rows: int, cols: int) -> bool:
    """Does bitsandbytes' CPU ``dequantize_4bit`` give back the NF4 weights its ``quantize_4bit`` made?

    With bitsandbytes 0.50.2 the native CPU kernel does not for some widths that are not a
    multiple of the blocksize (e.g. 32, 48, 96, 160 columns): its blocks no longer line up
    with the flat 64-element blocks used when quantizing. Widths that are multiples of 64,
    and odd widths (which take a pure-PyTorch path), are exact. We spot-check a few rows.
    """
    import bitsandbytes.functional as bnbf

    w = torch.randn(min(rows, 4), cols, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return torch.equal(bnbf.dequantize_4bit(packed, state).float(), dequantize_nf4(quantize_nf4(w)))


def _warn_on_bad_cpu_layers(model: nn.Module) -> None:
    bad = [(name, tuple(m.weight.quant_state.shape)) for name, m in model.named_modules()
           if getattr(getattr(m, "weight", None), "quant_state", None) is not None
           and not bnb_cpu_dequant_matches(*m.weight.quant_state.shape)]
    if bad:
        warnings.warn(
            f"bitsandbytes dequantizes {len(bad)} 4-bit layers wrongly on CPU (e.g. {bad[0][0]} of shape "
            f"{bad[0][1]}): rows whose length is not a multiple of 64 do not round-trip. The model runs, "
            "but those layers do not compute with their NF4 weights; use a model whose hidden and "
            "intermediate sizes are multiples of 64 (the tiny profile's are).",
            stacklevel=2,
        )


def quant_state_bytes(state) -> int:
    """Bytes of every tensor in a bitsandbytes QuantState (absmax, code table, nested state...)."""
    total = 0
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif type(value).__name__ == "QuantState":
            total += quant_state_bytes(value)
    return total


def linear_weight_bytes(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> dict[str, int]:
    """``{layer name: bytes}`` of each Linear's weight as stored (biases are not counted).

    A plain ``nn.Linear`` costs ``numel × element size``; a bitsandbytes ``Linear4bit``
    costs its packed codes plus everything in its quant state (absmax, nested absmax,
    code tables). ``lm_head`` is excluded by default: it is tied to the embedding here
    and is not quantized.
    """
    sizes = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in exclude:
            continue
        w = module.weight
        size = w.numel() * w.element_size()
        state = getattr(w, "quant_state", None)
        sizes[name] = size + (quant_state_bytes(state) if state is not None else 0)
    return sizes
