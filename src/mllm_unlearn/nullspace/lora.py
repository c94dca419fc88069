"""Null-space-constrained unlearning (NCU) on PEFT LoRA.

Paper, Sec. 3.2 ("Null-space-constrained unlearning") and 3.3: each targeted Linear gets
``W + B A`` (Eq. 16) with ``A = (U^perp)^T`` (Eq. 17) FROZEN and only ``B`` trained, so retain
inputs, for which ``A x ~ 0``, keep their output ``W x`` (Eq. 18). ``B`` starts at 0, so the adapted
model starts equal to the original. Sec. 4.3's ablations: ``subspace="random"`` (frozen random
orthonormal A, "CVF + Rand") and ``subspace="none"`` (standard LoRA, A and B trained, "Full CVF-only").

The reference model is the same model with adapters disabled (Appendix D.3). PEFT's
``disable_adapter()`` sets ``requires_grad=True`` on every LoRA weight when it exits, a frozen A
included; :func:`reference_model` re-freezes, and :func:`trainable_parameters` never returns a
frozen A whatever its ``requires_grad`` says.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from .bases import check_rank, null_space_basis, random_basis
from .calibrate import PEFT_PREFIX, LayerStats, target_linears

SUBSPACES = ("null", "random", "none")
#: attribute of the PeftModel holding the parameter names of the frozen A's
FROZEN_ATTR = "ncu_frozen_lora_A"


@dataclass
class NCUConfig:
    """NCU's LoRA settings.

    ``rank``: r, both the number of null directions (Eq. 15) and the LoRA rank (Eq. 16).
    ``alpha``: LoRA alpha; the update is scaled by alpha / r. None means alpha = rank (scaling 1).
    ``subspace``: ``null`` (NCU, Eq. 17), ``random`` (Sec. 4.3 "Rand") or ``none`` (plain LoRA).
    ``seed``: seeds the random subspace, and PEFT's random initialisation of A under ``none``.
    """

    rank: int = 8
    alpha: float | None = None
    subspace: str = "null"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.subspace not in SUBSPACES:
            raise ValueError(f"subspace {self.subspace!r} not in {SUBSPACES}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")

    @property
    def lora_alpha(self) -> float:
        return self.rank if self.alpha is None else self.alpha


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers of a PeftModel, keyed by their plain-model path."""
    return {name.removeprefix(PEFT_PREFIX): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def base_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen base weights W of the LoRA-wrapped layers (what CVF's simulated relearning attack moves)."""
    return [layer.base_layer.weight for layer in lora_layers(model).values()]


def _bases(
    layers: Mapping[str, torch.nn.Linear], cfg: NCUConfig, covariances: Mapping[str, LayerStats] | None
) -> dict[str, torch.Tensor]:
    """The frozen A of each layer (Eq. 17 or the random ablation); empty for ``subspace="none"``."""
    if cfg.subspace == "none":
        return {}
    if cfg.subspace == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        return {
            name: random_basis(layer.in_features, cfg.rank, generator, layer=name)
            for name, layer in sorted(layers.items())
        }
    covariances = covariances or {}
    missing = [name for name in layers if name not in covariances]
    if missing:
        raise ValueError(f"subspace='null' needs retain covariances of layer(s) {missing}")
    bases = {}
    for name, layer in layers.items():
        cov = covariances[name].cov
        if tuple(cov.shape) != (layer.in_features, layer.in_features):
            raise ValueError(
                f"covariance of layer {name} has shape {tuple(cov.shape)}, but its input width is {layer.in_features}"
            )
        bases[name] = null_space_basis(cov, cfg.rank, layer=name)
    return bases


def attach_lora(
    model: torch.nn.Module,
    pattern: str,
    cfg: NCUConfig,
    covariances: Mapping[str, LayerStats] | None = None,
    *,
    exclude: Iterable[str] = (),
) -> PeftModel:
    """Wrap ``model`` in a PeftModel with LoRA on every Linear matching ``pattern`` (minus ``exclude``).

    ``pattern`` is passed to PEFT as the ``target_modules`` string (re.fullmatch on module paths);
    ``exclude`` lists module paths to leave out, e.g. :func:`unused_layers`' answer. LoRA uses rank
    ``cfg.rank``, alpha ``cfg.lora_alpha``, no dropout and B = 0 (the adapted model starts equal
    to the original); PEFT's random A (``none``) is drawn from a generator seeded with ``cfg.seed``.
    For ``null``/``random`` each A is overwritten with its basis and frozen, so only B trains; the
    frozen parameters' names are recorded on the returned model (``FROZEN_ATTR``).

    Everything is validated before the model is touched: ValueError naming the layer if the rank
    exceeds its input width, or if its covariance is missing or of the wrong size.
    """
    exclude = set(exclude)
    layers = target_linears(model, pattern)
    unknown = sorted(exclude - set(layers))
    if unknown:
        raise ValueError(f"excluded layer(s) {unknown} are not matched by the pattern {pattern!r}")
    layers = {name: layer for name, layer in layers.items() if name not in exclude}
    if not layers:
        raise ValueError(f"every layer matched by {pattern!r} is excluded")
    for name, layer in layers.items():
        check_rank(cfg.rank, layer.in_features, name)
    bases = _bases(layers, cfg, covariances)

    # PEFT draws A (Kaiming-uniform) from the global generator, which torch seeds at random in each
    # process: seeded from cfg.seed here, so plain LoRA (the baselines) starts from the same A in every
    # run, and the caller's generator is left as it was
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.lora_alpha,
                target_modules=pattern,
                exclude_modules=sorted(exclude) or None,
                lora_dropout=0.0,
                init_lora_weights=True,
            ),
        )
    wrapped = lora_layers(peft_model)
    if set(wrapped) != set(layers):
        raise RuntimeError(
            f"PEFT wrapped {sorted(set(wrapped) ^ set(layers))} differently from the Linears matched by {pattern!r}"
        )
    adapter = peft_model.active_adapter
    frozen = set()
    with torch.no_grad():
        for name, basis in bases.items():
            weight = wrapped[name].lora_A[adapter].weight
            weight.copy_(basis)
            weight.requires_grad_(False)
            frozen.add(f"{PEFT_PREFIX}{name}.lora_A.{adapter}.weight")
    setattr(peft_model, FROZEN_ATTR, frozenset(frozen))
    return peft_model


def _frozen(model: torch.nn.Module) -> frozenset[str]:
    return getattr(model, FROZEN_ATTR, frozenset())


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimiser gets: parameters requiring grad, never a frozen A (only B under null/random)."""
    frozen = _frozen(model)
    return [p for name, p in model.named_parameters() if p.requires_grad and name not in frozen]


def refreeze(model: torch.nn.Module) -> None:
    """Set ``requires_grad=False`` again on the A's that :func:`attach_lora` froze."""
    for name in _frozen(model):
        model.get_parameter(name).requires_grad_(False)


@contextmanager
def reference_model(model: PeftModel) -> Iterator[PeftModel]:
    """The reference (original) model: ``model`` with its adapters disabled, re-frozen on exit.

    ``W x`` exactly, whatever B has learnt. Use it for reference IVRs and KL targets (under
    ``torch.no_grad()`` where no gradient is wanted).
    """
    try:
        with model.disable_adapter():
            yield model
    finally:
        refreeze(model)


def lora_A_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the active adapter's A matrices, keyed by plain-model layer path."""
    return {
        name: layer.lora_A[model.active_adapter].weight.detach().clone() for name, layer in lora_layers(model).items()
    }
