"""Fake quantisation of a model's Linear weights: round-to-nearest, quantise-dequantise in place.

Deployed checkpoints are often quantised; an unlearning update smaller than a quantisation bin is
rounded away and the forgotten knowledge comes back (Zhang et al., ICLR 2025, arXiv 2410.16454).
This module reproduces weight-only round-to-nearest (RTN) quantisation without any kernel: each
weight is replaced by its quantised value, so every later forward sees exactly what an integer
kernel with the same grid would compute (activations stay in floating point, as in weight-only
int8 / int4 deployment).

* ``group_size=None``: one grid per output channel (row of ``W``), symmetric by default:
  ``scale = max|w| / (2^(bits-1) - 1)``, ``q = clamp(round(w / scale), -(2^(bits-1) - 1), 2^(bits-1) - 1)``
  (2 bits: the ternary grid {-s, 0, s}).
* ``group_size=g``: one grid per run of ``g`` consecutive input weights of a row, asymmetric (min-max with
  a zero point, ``2^bits`` levels) as GPTQ / AWQ checkpoints store 4-bit weights (g = 64 or 128);
  the last group of a row may be shorter.

Every ``torch.nn.Linear`` is quantised except those whose name matches ``skip`` (default: the LM head,
which bitsandbytes, GPTQ and AWQ all keep in 16 bits); biases, embeddings and norms are left alone.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

#: Linear layers left in full precision by default
DEFAULT_SKIP = r"(?:.*\.)?lm_head"


@dataclass(frozen=True)
class QuantSpec:
    """One quantisation setting; ``name`` is how reports key it (``int4``, ``int4-g128``)."""

    bits: int
    group_size: int | None = None
    symmetric: bool | None = None  # None: symmetric per channel, asymmetric group-wise

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def is_symmetric(self) -> bool:
        return self.group_size is None if self.symmetric is None else self.symmetric

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """``int8``, ``int4``, ``int4-g128`` (also ``4``, ``4-g64``)."""
        m = re.fullmatch(r"(?:int)?(\d+)(?:-g(\d+))?", text.strip())
        if not m:
            raise ValueError(f"bad quantisation spec {text!r}; expected e.g. int8, int4, int4-g128")
        return cls(int(m.group(1)), int(m.group(2)) if m.group(2) else None)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The quantised-dequantised copy of a 2-D weight ``(out, in)``, in ``w``'s dtype."""
    out_features, in_features = w.shape
    x = w.detach().float()
    group = spec.group_size or in_features
    pad = -in_features % group
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(out_features, -1, group)
    if spec.is_symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        absmax = x.abs().amax(-1, keepdim=True)  # zero padding never raises a group's max
        scale = (absmax / qmax).clamp_min(1e-12)
        q = torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    else:
        levels = 2**spec.bits - 1
        # zero is always in range (exactly representable, as in GPTQ / AWQ), so zero padding changes nothing
        lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
        scale = ((hi - lo) / levels).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale
    return q.reshape(out_features, -1)[:, :in_features].to(w.dtype)


@torch.no_grad()
def fake_quantize_(model: torch.nn.Module, spec: QuantSpec, skip: str | None = DEFAULT_SKIP) -> list[str]:
    """Quantise-dequantise every Linear weight of ``model`` in place; returns the names quantised."""
    rx = re.compile(skip) if skip else None
    done = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not (rx and rx.fullmatch(name)):
            module.weight.copy_(quantize_weight(module.weight, spec))
            done.append(name)
    if not done:
        raise ValueError("no Linear layer to quantise")
    return done


def quantized_copy(model: torch.nn.Module, spec: QuantSpec, skip: str | None = DEFAULT_SKIP) -> torch.nn.Module:
    """A deep copy of ``model`` with its Linear weights fake-quantised; ``model`` is unchanged."""
    clone = copy.deepcopy(model)
    fake_quantize_(clone, spec, skip)
    return clone.eval()
