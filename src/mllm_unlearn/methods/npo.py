"""NPO, negative preference optimisation (Zhang et al. 2024, "Negative preference optimization")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.loading import load_model
from ..models.scoring import encode_pairs, sequence_logprob
from .base import UnlearnContext, register
from .baseline import Baseline, BaselineConfig
from .losses import npo_loss


@dataclass
class NPOConfig(BaselineConfig):
    beta: float = 0.1  # NPO's inverse temperature
    retain_weight: float = 1.0  # 0 gives pure NPO (forget term only)
    reference_model_path: str = ""  # "" = adapters disabled; else a checkpoint (e.g. a retain-only model)


@register
class NPO(Baseline):
    """loss = -(2/beta) * mean log sigmoid(-beta * (logp_theta(y|x) - logp_ref(y|x))) on forget
           + w * NLL(retain),
    logp = per-sequence summed answer log-probability, beta = 0.1 (public configs: 0.1-0.4).

    ``retain_weight`` w = 1 by default: open-unlearning's NPO and the NPO paper's best variant
    (NPO+RT) add the retain NLL, and it keeps NPO comparable with GA_Diff / KL_Min which also see the
    retain set; ``retain_weight=0`` gives the forget term alone.
    Reference: the model before unlearning (adapters disabled, no second copy) by default;
    MLLMU-Bench's code (and the paper's Sec. 4.1 description) uses an "oracle" trained on the retain
    set only: give its checkpoint as ``reference_model_path``.
    """

    name = "npo"
    config_class = NPOConfig

    def setup(self, ctx: UnlearnContext) -> None:
        super().setup(ctx)
        self.ref_lm = None
        if self.cfg.reference_model_path:
            self.ref_lm = load_model(self.cfg.reference_model_path, device=ctx.lm.model.device)
            self.ref_lm.model.eval().requires_grad_(False)

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        forget = self.forget_batch(ctx)
        batch = encode_pairs(ctx.lm, forget)
        logp, _ = sequence_logprob(*ctx.lm.arch.answer_logits(ctx.lm.model, batch), len(forget))
        logp_ref, _ = sequence_logprob(*self.reference_logits(ctx, batch), len(forget))
        forget_term = npo_loss(logp, logp_ref, self.cfg.beta)
        retain_term = self.retain_term(ctx, self.cfg.retain_weight)
        return forget_term + retain_term, {
            "npo": forget_term.item(),
            "retain_nll": retain_term.item(),
            "logratio": (logp - logp_ref).mean().item(),
        }
