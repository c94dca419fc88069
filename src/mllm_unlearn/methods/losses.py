"""The paper's loss terms as pure tensor functions (Sec. 3.1, Eq. 2-11), testable on hand-made tensors.

Shapes: pooled IVRs ``z`` are (batch, d); token-level IVRs ``H`` are (batch, tokens, d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool(h: torch.Tensor) -> torch.Tensor:
    """g(.) of Eq. 2: mean pooling over tokens, (B, T, d) -> (B, d)."""
    return h.mean(dim=1)


def cvf_push(z_u: torch.Tensor, z_r: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """L_CVF-push, Eq. 4 (with Eq. 3's normalisation and temperature):

        -log( sum_k exp(sim(z_u, k)) / (exp(sim(z_u, z_r)) + sum_k exp(sim(z_u, k))) ),
        sim(u, r) = u_bar . r_bar / tau

    An InfoNCE with the *negatives* in the numerator: minimising it lowers the softmax weight of the
    unlearned IVR's own reference IVR ``z_r`` against the queue ``queue`` (K, d). Mean over the batch.
    """
    if queue.numel() == 0:
        raise ValueError("Eq. 4 needs a non-empty negative queue")
    u = F.normalize(z_u, dim=-1)
    pos = (u * F.normalize(z_r, dim=-1)).sum(-1, keepdim=True) / tau  # (B, 1)
    neg = u @ F.normalize(queue, dim=-1).T / tau  # (B, K)
    neg_lse = torch.logsumexp(neg, dim=-1)
    all_lse = torch.logsumexp(torch.cat([pos, neg], dim=-1), dim=-1)
    return (all_lse - neg_lse).mean()


def nmse_push(z_u: torch.Tensor, z_r: torch.Tensor) -> torch.Tensor:
    """L_nMSE, Eq. 5: -||z_u - z_r||^2 (the naive push of the Table 2 ablation). Mean over the batch."""
    return -((z_u - z_r) ** 2).sum(-1).mean()


def cvf_pull(z_u: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """L_CVF-pull, Eq. 6: 1 - cos(z_u, p_r^a), toward the anchor = mean reference IVR of the retain
    mini-batch. Mean over the batch."""
    return (1 - F.cosine_similarity(z_u, anchor.expand_as(z_u), dim=-1)).mean()


def cvf_loss(push: torch.Tensor, pull: torch.Tensor, lam: float) -> torch.Tensor:
    """L_CVF, Eq. 7: lambda * push + pull."""
    return lam * push + pull


def retention_mse(h_u: torch.Tensor, h_r: torch.Tensor) -> torch.Tensor:
    """L_RET, Eq. 9: (1/N) ||H_u - H_r||_F^2 with N the number of tokens (batch x tokens), i.e. the
    mean over tokens of each token's squared L2 distance to the reference model's token."""
    return ((h_u - h_r) ** 2).sum(-1).mean()


def total_loss(l_cvf: torch.Tensor, l_ret: torch.Tensor, l_gum: torch.Tensor, alpha: float,
               beta: float) -> torch.Tensor:
    """Eq. 11: alpha * L_CVF + beta * L_RET + L_GUM (L_GUM, Eq. 10, is the retain answer NLL)."""
    return alpha * l_cvf + beta * l_ret + l_gum
