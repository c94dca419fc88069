"""MANU, modality-aware neuron unlearning (Liu et al. 2025, "Modality-aware neuron pruning for unlearning
in multimodal large language models"): pruning, no training."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..data.sample import Sample
from ..models.scoring import encode_images, encode_pairs, eval_mode, image_batches
from ..nullspace import lora_layers, target_linears, unused_layers
from .base import UnlearnContext, distinct_images, register
from .baseline import Baseline, BaselineConfig, select, subsample
from .losses import manu_scores, top_k_rows


class _ActivationStats:
    """Streaming per-neuron statistics of a Linear's outputs (float64): mean |a|, std, RMS and the
    frequency of |a| > threshold over all tokens seen."""

    def __init__(self, width: int, threshold: float) -> None:
        self.n, self.threshold = 0, threshold
        self.abs, self.sum, self.sq, self.freq = (torch.zeros(width, dtype=torch.float64) for _ in range(4))

    def add(self, a: torch.Tensor) -> None:
        a = a.detach().reshape(-1, a.shape[-1]).to("cpu", torch.float64)
        self.n += a.shape[0]
        self.abs += a.abs().sum(0)
        self.sum += a.sum(0)
        self.sq += (a * a).sum(0)
        self.freq += (a.abs() > self.threshold).sum(0)

    def result(self) -> dict[str, torch.Tensor]:
        if self.n == 0:
            raise ValueError("no activations recorded")
        mean, msq = self.sum / self.n, self.sq / self.n
        return {
            "mean_abs": self.abs / self.n,
            "std": (msq - mean**2).clamp_min(0).sqrt(),
            "rms": msq.sqrt(),
            "freq": self.freq / self.n,
        }


@torch.no_grad()
def prune_rows(
    model: torch.nn.Module, rows: Mapping[str, Sequence[int] | torch.Tensor], zero_bias: bool = False
) -> None:
    """Zero the weight rows (output neurons) ``rows[path]`` of the Linears at those module paths
    (paths of the plain model; LoRA-wrapped layers are edited in their base layer)."""
    layers = target_linears(model, "|".join(map(re.escape, rows)))
    for path, idx in rows.items():
        idx = torch.as_tensor(idx, dtype=torch.long)
        layers[path].weight[idx] = 0
        if zero_bias and layers[path].bias is not None:
            layers[path].bias[idx] = 0


@dataclass
class MANUConfig(BaselineConfig):
    prune_fraction: float = 0.02  # global top-k = ceil(fraction * neurons)
    w_mean_abs: float = 2.0
    w_std: float = 2.0
    w_rms: float = 2.0
    w_freq: float = 0.0
    freq_threshold: float = 0.1
    layers: str = r".*\.mlp\..*"  # which Linears of the scope hold MANU's neurons (MLP layers)
    max_samples: int = 256  # at most this many samples (images / text pairs) per set (0 = all)
    zero_bias: bool = False


@register
class MANU(Baseline):
    """Neurons are the output rows of the targeted Linears: the MLP layers (``layers`` regex) inside
    the update scope, i.e. vision ``mlp.fc1/fc2`` and LLM ``mlp.gate/up/down_proj`` for the default
    scope ``all`` (MANU prunes both modalities; ``--scope visual`` is App. D.2's variant). For each
    neuron, activation statistics I_s over the forget people's data D_f and the retain people's D_r
    (s = mean |a|, std, RMS, frequency of |a| > 0.1, weights 2, 2, 2, 0) give

        score = sum_s w_s * (I_s(D_f) / (I_s(D_r) + 1e-5) - 1),

    and the weight rows of the global top 2 % are zeroed (biases kept unless ``zero_bias``).
    Modality-aware: vision-side neurons are measured on the images (the vision tower and projector
    never see the text, so the image forward is the image+text forward's vision part), LLM-side
    neurons on the text-only pairs (question + answer, padding excluded). Vision layers whose output
    the image features do not use (LLaVA's last CLIP layer) are left out.

    Saving: the zeroed rows are in the base weights, which a PEFT adapter does not carry, so a MANU
    run is saved as a merged model (the CLI and the demo call ``save_run(..., merge=True)`` for every
    method with ``trains = False``). ``self.pruned`` ({module path: row indices}) records the edit
    in memory only; :func:`prune_rows` applies such a record to a model.
    """

    name = "manu"
    config_class = MANUConfig
    default_scope = "all"
    trains = False

    def _limit(self, ctx: UnlearnContext, samples: Sequence[Sample]) -> list[Sample]:
        return subsample(samples, self.cfg.max_samples, ctx.seed)

    def _measure(
        self, ctx: UnlearnContext, layers: Mapping[str, torch.nn.Linear], samples: Sequence[Sample], images: bool
    ) -> dict[str, dict[str, torch.Tensor]]:
        lm = ctx.lm
        if not samples:
            raise ValueError(
                f"MANU needs {'images' if images else 'text-only pairs'} of both the forget and the retain people"
            )
        stats = {n: _ActivationStats(layer.out_features, self.cfg.freq_threshold) for n, layer in layers.items()}
        token_mask: list[torch.Tensor | None] = [None]

        def hook_for(name: str):
            def hook(module, args, out):
                stats[name].add(out if token_mask[0] is None else out[token_mask[0]])

            return hook

        handles = [layer.register_forward_hook(hook_for(n)) for n, layer in layers.items()]
        try:
            if images:
                for inputs in image_batches(lm, samples, ctx.batch_size):
                    lm.arch.image_features(lm.model, inputs)
            else:
                for i in range(0, len(samples), ctx.batch_size):
                    batch = encode_pairs(lm, samples[i : i + ctx.batch_size])
                    token_mask[0] = batch.inputs["attention_mask"].bool()
                    lm.model.get_base_model().model(**batch.inputs)
        finally:
            for h in handles:
                h.remove()
        return {n: s.result() for n, s in stats.items()}

    def _scores(
        self,
        ctx: UnlearnContext,
        layers: Mapping[str, torch.nn.Linear],
        forget: Sequence[Sample],
        retain: Sequence[Sample],
        images: bool,
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        weights = {"mean_abs": cfg.w_mean_abs, "std": cfg.w_std, "rms": cfg.w_rms, "freq": cfg.w_freq}
        sf, sr = self._measure(ctx, layers, forget, images), self._measure(ctx, layers, retain, images)
        return {n: manu_scores(sf[n], sr[n], weights) for n in layers}

    def apply(self, ctx: UnlearnContext) -> dict[str, float]:
        cfg, lm = self.cfg, ctx.lm
        # the update scope is where the driver put LoRA (its B = 0: the adapter is not used)
        layers = {n: m.get_base_layer() for n, m in lora_layers(lm.model).items() if re.fullmatch(cfg.layers, n)}
        if not layers:
            raise ValueError(f"MANU: no Linear of the update scope matches layers={cfg.layers!r}")
        visual_re = lm.arch.scope_pattern("visual")
        vision = {n: m for n, m in layers.items() if re.fullmatch(visual_re, n)}
        text = {n: m for n, m in layers.items() if n not in vision}
        self.scores: dict[str, torch.Tensor] = {}
        with eval_mode(lm.model), torch.no_grad():
            if vision:
                f_img = self._limit(ctx, distinct_images(ctx.forget))
                r_img = self._limit(ctx, distinct_images(ctx.retain))
                probe = encode_images(lm, r_img[:4]).inputs
                with torch.enable_grad():
                    dead = set(
                        unused_layers(lm.model, vision, probe, features=lambda m, x: lm.arch.image_features(m, dict(x)))
                    )
                vision = {n: m for n, m in vision.items() if n not in dead}
                self.scores.update(self._scores(ctx, vision, f_img, r_img, True))
            if text:
                f_txt = self._limit(ctx, select(ctx.forget, "qa"))
                r_txt = self._limit(ctx, select(ctx.retain, "qa"))
                self.scores.update(self._scores(ctx, text, f_txt, r_txt, False))
        rows = top_k_rows(self.scores, cfg.prune_fraction)
        prune_rows(lm.model, rows, cfg.zero_bias)
        self.pruned = {n: r.tolist() for n, r in rows.items()}
        n_pruned = sum(len(r) for r in rows.values())
        return {
            "pruned": float(n_pruned),
            "layers_pruned": float(len(rows)),
            "min_pruned_score": float(min(self.scores[n][r].min().item() for n, r in rows.items())),
        }
