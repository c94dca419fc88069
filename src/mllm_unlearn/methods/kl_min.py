"""KL_Min, KL minimisation (Nguyen et al. 2020, "Variational Bayesian unlearning"; MLLMU-Bench's KL_Min)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.scoring import encode_pairs
from .base import UnlearnContext, register
from .baseline import Baseline, BaselineConfig
from .losses import ga_loss, kl_divergence

KL_DIRECTIONS = ("ref_theta", "theta_ref")


@dataclass
class KLMinConfig(BaselineConfig):
    kl_direction: str = "ref_theta"  # KL(p_ref || p_theta) (public code); "theta_ref" = KL(p_theta || p_ref)
    kl_weight: float = 1.0
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, not {self.kl_direction!r}")


@register
class KLMin(Baseline):
    """loss = -NLL(forget) + NLL(retain) + KL(p_ref || p_theta) on the retain batch's answer positions.

    The public code calls ``F.kl_div(log p_theta, p_ref, reduction="batchmean")`` (that is
    KL(p_ref || p_theta), our default) on (batch, tokens, vocab) tensors, which divides a sum over
    all positions by the batch size; we average over answer positions only (the retain answers are
    what must not move; prompt and padding positions would dilute the term with length).
    ``kl_direction="theta_ref"`` gives the reverse KL(p_theta || p_ref).
    """

    name = "kl_min"
    config_class = KLMinConfig

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        nll_f = ctx.nll(self.forget_batch(ctx))
        batch = encode_pairs(ctx.lm, self.retain_batch(ctx))
        logits, targets, _ = ctx.lm.arch.answer_logits(ctx.lm.model, batch)
        ref_logits, _, _ = self.reference_logits(ctx, batch)
        nll_r = F.cross_entropy(logits.float(), targets)
        kl = (
            kl_divergence(ref_logits, logits)
            if self.cfg.kl_direction == "ref_theta"
            else kl_divergence(logits, ref_logits)
        )
        loss = ga_loss(nll_f) + self.cfg.retain_weight * nll_r + self.cfg.kl_weight * kl
        return loss, {"forget_nll": nll_f.item(), "retain_nll": nll_r.item(), "kl": kl.item()}
