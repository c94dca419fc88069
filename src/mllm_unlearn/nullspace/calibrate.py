"""Calibration: the retain set's layer-input second moments that define NCU's null spaces.

Paper, Sec. 3.2 ("Identify subspace associated with retained knowledge"): for every LoRA-targeted
Linear ``l`` of the visual module, stack the *input* activations of all retain tokens into
``X_l`` (Eq. 12) and form the uncentred covariance ``C_l = X_l^T X_l / n_l`` (Eq. 13). This module
does that in ONE streaming pass (a forward pre-hook per layer adds ``x^T x`` in float64 and counts
tokens; activations are never held), and finds target layers whose output the image features do not
use (LLaVA-1.5's ``vision_feature_layer=-2`` leaves the last CLIP layer unused), so that callers can
leave them out of the LoRA.

Calibrate the *reference* model (Sec. 3.2: "using the reference model"): the original model before
``attach_lora``, or a PeftModel inside :func:`mllm_unlearn.nullspace.reference_model`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm

from ..models.base import get_arch
from ..models.scoring import eval_mode

#: prefix PEFT puts in front of the plain model's module paths
PEFT_PREFIX = "base_model.model."

Inputs = Mapping[str, Any]
#: runs the model on one batch of inputs; only its side effects (hooks) and graph matter
ForwardFn = Callable[[torch.nn.Module, Inputs], Any]


@dataclass
class LayerStats:
    """Retain statistics of one layer's input: ``cov`` = C_l = X_l^T X_l / n_l (Eq. 13, float64, d x d)
    and ``n_tokens`` = n_l, the number of token activations it was averaged over (Eq. 12)."""

    cov: torch.Tensor
    n_tokens: int


def target_linears(model: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` whose module path ``re.fullmatch``es ``pattern``, keyed by that path.

    Paths are those of the plain model (``model.vision_tower.encoder.layers.0.mlp.fc1``), as PEFT
    matches ``target_modules``; for a PeftModel the ``base_model.model.`` prefix is stripped and a
    LoRA-wrapped layer yields its base Linear. Raises ValueError naming ``pattern`` if nothing matches.
    """
    found: dict[str, torch.nn.Linear] = {}
    tuner_prefixes: list[str] = []  # LoRA internals (base_layer, lora_A/B) are never targets themselves
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in tuner_prefixes):
            continue
        path = name.removeprefix(PEFT_PREFIX)
        if isinstance(module, BaseTunerLayer):
            tuner_prefixes.append(name + ".")
            module = module.get_base_layer()
        if isinstance(module, torch.nn.Linear) and re.fullmatch(pattern, path):
            found[path] = module
    if not found:
        raise ValueError(f"no nn.Linear module path fully matches the pattern {pattern!r}")
    return found


def _layers(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Linear]:
    """The Linears at exactly these paths; ValueError listing any that are missing."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        raise ValueError("no layer names given")
    found = target_linears(model, "|".join(map(re.escape, wanted)))
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"no nn.Linear at module path(s) {missing}")
    return {n: found[n] for n in wanted}


def full_forward(model: torch.nn.Module, inputs: Inputs) -> Any:
    """The default calibration forward: the whole model, ``model(**inputs)``."""
    return model(**inputs)


def _on_device(inputs: Inputs, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def collect_covariances(
    model: torch.nn.Module,
    names: Iterable[str],
    inputs: Iterable[Inputs],
    *,
    forward: ForwardFn = full_forward,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """C_l = X_l^T X_l / n_l (Eq. 12-13) for each named Linear's input, in one pass over ``inputs``.

    ``inputs`` yields model-input dicts of the retain set (e.g. ``Batch.inputs``); each is moved to
    the model's device and run through ``forward`` under ``torch.no_grad()`` in eval mode. A forward
    pre-hook flattens all leading dims of the layer input to tokens and adds ``x^T x`` (float64) to
    a running sum, so memory is O(d^2) per layer whatever the data size. For the visual scope,
    ``forward=arch.image_features`` runs only the vision tower and projector (same activations there,
    far cheaper than ``full_forward``). Hooks are removed even if the forward fails.

    Raises RuntimeError naming every layer that saw no token (its module never ran in ``forward``).
    """
    layers = _layers(model, names)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook_for(name: str) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if name in sums:
                sums[name].addmm_(x.T, x)
            else:
                sums[name] = x.T @ x
            counts[name] += x.shape[0]

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            total = len(inputs) if hasattr(inputs, "__len__") else None
            for batch in tqdm(inputs, total=total, desc="NCU calibration", disable=not progress):
                forward(model, _on_device(batch, device))
    finally:
        for handle in handles:
            handle.remove()
    silent = [n for n, c in counts.items() if c == 0]
    if silent:
        raise RuntimeError(
            f"calibration saw no input tokens at layer(s) {silent}: they never ran in the "
            "calibration forward (wrong forward function, or no data)"
        )
    return {n: LayerStats(cov=(sums[n] / counts[n]).cpu(), n_tokens=counts[n]) for n in layers}


def default_image_features(model: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
    """The architecture adapter's per-image projector outputs (``ArchAdapter.image_features``)."""
    return get_arch(model.config.model_type).image_features(model, dict(inputs))


def unused_layers(
    model: torch.nn.Module, names: Iterable[str], inputs: Inputs, *, features: ForwardFn = default_image_features
) -> list[str]:
    """The named Linears whose output does not influence the image features (backward probe).

    Runs ``features`` (default: the adapter's projector outputs) on one batch, backpropagates a
    random projection of them to the named layers' weights, and returns the layers whose weight got
    no or an all-zero gradient. Such layers run (so their hooks fire) but their output is dropped,
    e.g. the last CLIP layer under LLaVA-1.5's ``vision_feature_layer=-2``; LoRA there would get no
    gradient, so callers exclude them. ``requires_grad`` and ``.grad`` of the weights are left as found.
    """
    layers = _layers(model, names)
    weights = [layer.weight for layer in layers.values()]
    was_required = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad(), eval_mode(model):
            out = features(model, _on_device(inputs, next(model.parameters()).device))
            probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
            grads = torch.autograd.grad((out * probe).sum(), weights, allow_unused=True)
    finally:
        for w, required in zip(weights, was_required):
            w.requires_grad_(required)
    return [name for name, g in zip(layers, grads) if g is None or not bool(g.any())]
