"""GA, gradient ascent on the forget set (Thudi et al. 2022, "Unrolling SGD")."""

from __future__ import annotations

import torch

from .base import UnlearnContext, register
from .baseline import Baseline
from .losses import ga_loss


@register
class GA(Baseline):
    """Gradient ascent: loss = -NLL(forget).

    Unbounded below: at a high learning rate the model collapses to gibberish (reported by users of
    the public codes); nothing here prevents it, as nothing in the public codes does.
    """

    name = "ga"

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        nll_f = ctx.nll(self.forget_batch(ctx))
        return ga_loss(nll_f), {"forget_nll": nll_f.item()}
