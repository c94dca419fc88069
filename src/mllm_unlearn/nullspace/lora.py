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

from .bases import check_rank, forget_specific_directions, null_space_basis, random_basis
from .calibrate import PEFT_PREFIX, LayerStats, target_linears

SUBSPACES = ("null", "random", "none")
#: attribute of the PeftModel holding the parameter names of the frozen A's
FROZEN_ATTR = "ncu_frozen_lora_A"
#: attribute of the PeftModel holding each layer's :class:`CalibrationEnergy` (null-space A only)
ENERGY_ATTR = "ncu_calibration_energy"


@dataclass
class NCUConfig:
    """NCU's LoRA settings.

    ``rank``: r, both the number of null directions (Eq. 15) and the LoRA rank (Eq. 16).
    ``alpha``: LoRA alpha; the update is scaled by alpha / r. None means alpha = rank (scaling 1).
    ``subspace``: ``null`` (NCU, Eq. 17), ``random`` (Sec. 4.3 "Rand") or ``none`` (plain LoRA).
    ``seed``: seeds the random subspace, and PEFT's random initialisation of A under ``none``.
    ``forget_directions``: k extra rows of A per layer (``null`` only; not in the paper): the directions
    outside the r null directions where the request's forget inputs carry at least ``forget_ratio`` times
    the calibration inputs' energy (:func:`~mllm_unlearn.nullspace.bases.forget_specific_directions`),
    most forget-specific first; a layer with fewer such directions gets zero rows (their B columns get no
    gradient). The LoRA rank is then r + k. 0: A is the paper's null space alone.
    """

    rank: int = 8
    alpha: float | None = None
    subspace: str = "null"
    seed: int = 0
    forget_directions: int = 0
    forget_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.subspace not in SUBSPACES:
            raise ValueError(f"subspace {self.subspace!r} not in {SUBSPACES}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.forget_directions < 0:
            raise ValueError(f"forget_directions must be >= 0, got {self.forget_directions}")
        if self.forget_directions and self.subspace != "null":
            raise ValueError(f"forget_directions extends a null-space A; subspace {self.subspace!r} has none")
        if not self.forget_ratio >= 1:
            raise ValueError(f"forget_ratio must be >= 1 (forget over calibration energy), got {self.forget_ratio}")

    @property
    def lora_rank(self) -> int:
        """The LoRA rank: the null directions plus the forget-specific rows."""
        return self.rank + self.forget_directions

    @property
    def lora_alpha(self) -> float:
        return self.lora_rank if self.alpha is None else self.alpha


@dataclass
class CalibrationEnergy:
    """What one adapted layer's calibration covariance C (Eq. 13) says about its update dW = s B A (Eq. 16),
    kept so that C itself (d x d) need not be: ``gram`` = A C A^T (r x r, float32) and ``output`` =
    trace(W C W^T), the mean square of the layer's output W x over the calibration tokens. Then
    trace(dW C dW^T) = s^2 trace(B gram B^T) for any B (``methods.losses.calibration_output_change``)."""

    gram: torch.Tensor
    output: float


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers of a PeftModel, keyed by their plain-model path."""
    return {name.removeprefix(PEFT_PREFIX): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def base_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen base weights W of the LoRA-wrapped layers (what CVF's simulated relearning attack moves)."""
    return [layer.base_layer.weight for layer in lora_layers(model).values()]


def _forget_rows(null: torch.Tensor, cov: torch.Tensor, forget_cov: torch.Tensor, cfg: NCUConfig, name: str):
    """A's forget-specific rows (:attr:`NCUConfig.forget_directions`), orthonormal, zero-padded to k.

    Orthonormalising keeps each row in the span of generalised eigenvectors of ratio >= ``forget_ratio``,
    where every vector's ratio is a weighted mean of theirs: each row is as forget-specific as asked."""
    ratios, directions = forget_specific_directions(cov, forget_cov, null, layer=name)
    chosen = directions[: cfg.forget_directions][ratios[: cfg.forget_directions] >= cfg.forget_ratio]
    rows = torch.zeros(cfg.forget_directions, null.shape[1], dtype=torch.float64)
    if len(chosen):  # orthonormalised in rank order: the most forget-specific direction is kept as it is
        rows[: len(chosen)] = torch.linalg.qr(chosen.T)[0].T
    return rows.to(torch.float32)


def _bases(
    layers: Mapping[str, torch.nn.Linear],
    cfg: NCUConfig,
    covariances: Mapping[str, LayerStats] | None,
    forget_covariances: Mapping[str, LayerStats] | None = None,
) -> dict[str, torch.Tensor]:
    """The frozen A of each layer (Eq. 17 or the random ablation, plus any forget-specific rows);
    empty for ``subspace="none"``."""
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
    missing = [name for name in layers if cfg.forget_directions and name not in (forget_covariances or {})]
    if missing:
        raise ValueError(f"forget_directions needs the forget request's covariances of layer(s) {missing}")
    bases = {}
    for name, layer in layers.items():
        cov = covariances[name].cov
        if tuple(cov.shape) != (layer.in_features, layer.in_features):
            raise ValueError(
                f"covariance of layer {name} has shape {tuple(cov.shape)}, but its input width is {layer.in_features}"
            )
        bases[name] = null_space_basis(cov, cfg.rank, layer=name)
        if cfg.forget_directions:
            extra = _forget_rows(bases[name], cov, forget_covariances[name].cov, cfg, name)
            bases[name] = torch.cat([bases[name], extra])
    return bases


def _energies(
    layers: Mapping[str, torch.nn.Linear], bases: Mapping[str, torch.Tensor], covariances: Mapping[str, LayerStats]
) -> dict[str, CalibrationEnergy]:
    """Each null-space layer's :class:`CalibrationEnergy`, in float64 on the CPU (as its basis). One
    (out x d) by (d x d) product per layer: a small share of the basis's eigendecomposition (CLIP-L's widest
    input, fc2 at d = 4096: 1.1 s against eigh's 16 s on 2 CPU cores)."""
    out = {}
    for name, basis in bases.items():
        a, c = basis.to(torch.float64), covariances[name].cov.to("cpu", torch.float64)
        w = layers[name].weight.detach().to("cpu", torch.float64)
        out[name] = CalibrationEnergy(gram=(a @ c @ a.T).to(torch.float32), output=float(((w @ c) * w).sum()))
    return out


def calibration_terms(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float, float]]:
    """Per adapted layer of a model :func:`attach_lora` gave a null-space A, in path order: (B, A C A^T on B's
    device, trace(W C W^T), LoRA scaling s), the arguments of
    :func:`~mllm_unlearn.methods.losses.calibration_output_change`. B is the live parameter, so the terms
    follow training. ValueError when the model has no calibration (a random or trained A, or no NCU model)."""
    energy = getattr(model, ENERGY_ATTR, None)
    if not energy:
        raise ValueError(
            "no calibration covariances on this model: only a null-space A (subspace='null') is calibrated"
        )
    layers, adapter = lora_layers(model), model.active_adapter
    terms = []
    for name, e in sorted(energy.items()):
        b = layers[name].lora_B[adapter].weight
        terms.append((b, e.gram.to(b.device), e.output, layers[name].scaling[adapter]))
    return terms


def attach_lora(
    model: torch.nn.Module,
    pattern: str,
    cfg: NCUConfig,
    covariances: Mapping[str, LayerStats] | None = None,
    *,
    exclude: Iterable[str] = (),
    forget_covariances: Mapping[str, LayerStats] | None = None,
) -> PeftModel:
    """Wrap ``model`` in a PeftModel with LoRA on every Linear matching ``pattern`` (minus ``exclude``).

    ``pattern`` is passed to PEFT as the ``target_modules`` string (re.fullmatch on module paths);
    ``exclude`` lists module paths to leave out, e.g. :func:`unused_layers`' answer. LoRA uses rank
    ``cfg.rank``, alpha ``cfg.lora_alpha``, no dropout and B = 0 (the adapted model starts equal
    to the original); PEFT's random A (``none``) is drawn from a generator seeded with ``cfg.seed``.
    For ``null``/``random`` each A is overwritten with its basis and frozen, so only B trains; the
    frozen parameters' names are recorded on the returned model (``FROZEN_ATTR``). With
    ``cfg.forget_directions`` A gains that many forget-specific rows per layer, from
    ``forget_covariances`` (the request's inputs, Eq. 13) against ``covariances``. A null-space model
    also keeps each layer's :class:`CalibrationEnergy` (:func:`calibration_terms`).

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
        check_rank(cfg.lora_rank, layer.in_features, name)
    bases = _bases(layers, cfg, covariances, forget_covariances)

    # PEFT draws A (Kaiming-uniform) from the global generator, which torch seeds at random in each
    # process: seeded from cfg.seed here, so plain LoRA (the baselines) starts from the same A in every
    # run, and the caller's generator is left as it was
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_rank,
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
    if cfg.subspace == "null":
        setattr(peft_model, ENERGY_ATTR, _energies(layers, bases, covariances))
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
