"""GA_Diff, gradient difference (Liu et al. 2022, "Continual learning and private unlearning")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import UnlearnContext, register
from .baseline import Baseline, BaselineConfig
from .losses import ga_loss


@dataclass
class GADiffConfig(BaselineConfig):
    alternate: bool = False  # True: even steps -NLL(forget), odd steps NLL(retain) (MLLMU-Bench's code)
    retain_weight: float = 1.0


@register
class GADiff(Baseline):
    """Gradient difference: loss = -NLL(forget) + w * NLL(retain), w = 1.

    The public code alternates forget and retain steps; we sum both terms in one step by default
    (every update sees both objectives, and the step count means the same thing as for the other
    methods). ``alternate=True`` gives the public code's schedule (even steps forget, odd retain).
    """

    name = "ga_diff"
    config_class = GADiffConfig

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.alternate:
            if step % 2 == 0:
                nll_f = ctx.nll(self.forget_batch(ctx))
                return ga_loss(nll_f), {"forget_nll": nll_f.item()}
            nll_r = ctx.nll(self.retain_batch(ctx))
            return self.cfg.retain_weight * nll_r, {"retain_nll": nll_r.item()}
        nll_f, nll_r = ctx.nll(self.forget_batch(ctx)), ctx.nll(self.retain_batch(ctx))
        loss = ga_loss(nll_f) + self.cfg.retain_weight * nll_r
        return loss, {"forget_nll": nll_f.item(), "retain_nll": nll_r.item()}
