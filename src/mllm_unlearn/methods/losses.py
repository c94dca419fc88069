"""Every loss as a pure tensor function, testable on hand-made tensors: the paper's terms (Sec. 3.1,
Eq. 2-11) and the baselines' (each citing its own paper).

Shapes: pooled IVRs ``z`` are (batch, d); token-level IVRs ``H`` are (batch, tokens, d).
Baselines: NLL = mean answer-token negative log-likelihood of a batch; logp(y|x) = per-sequence
SUMMED answer log-probability (:func:`mllm_unlearn.models.scoring.sequence_logprob`); "ref" = the
model before unlearning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


def pool(h: torch.Tensor) -> torch.Tensor:
    """g(.) of Eq. 2: mean pooling over tokens, (B, T, d) -> (B, d)."""
    return h.mean(dim=1)


def cvf_push(
    z_u: torch.Tensor,
    z_r: torch.Tensor,
    queue: torch.Tensor,
    tau: float,
    weights: torch.Tensor | None = None,
    floor: float = 0.0,
) -> torch.Tensor:
    """L_CVF-push, Eq. 4 (with Eq. 3's normalisation and temperature):

        -log( sum_k exp(sim(z_u, k)) / (exp(sim(z_u, z_r)) + sum_k exp(sim(z_u, k))) ),
        sim(u, r) = u_bar . r_bar / tau

    An InfoNCE with the *negatives* in the numerator: minimising it lowers the softmax weight of the
    unlearned IVR's own reference IVR ``z_r`` against the queue ``queue`` (K, d). Mean over the batch,
    or the ``weights``-weighted mean (B,) when given. With ``floor`` f > 0 (not in the paper;
    ``CVFConfig.push_floor``) each IVR's term t enters as log(t + f): its gradient divided by t + f, so an
    IVR whose term is already small (it resembles some negatives) keeps being pushed until t is well below f.
    """
    if queue.numel() == 0:
        raise ValueError("Eq. 4 needs a non-empty negative queue")
    u = F.normalize(z_u, dim=-1)
    pos = (u * F.normalize(z_r, dim=-1)).sum(-1, keepdim=True) / tau  # (B, 1)
    neg = u @ F.normalize(queue, dim=-1).T / tau  # (B, K)
    neg_lse = torch.logsumexp(neg, dim=-1)
    all_lse = torch.logsumexp(torch.cat([pos, neg], dim=-1), dim=-1)
    per = all_lse - neg_lse
    if floor:
        per = torch.log(per + floor)
    return per.mean() if weights is None else (weights * per).sum() / weights.sum()


def nmse_push(z_u: torch.Tensor, z_r: torch.Tensor) -> torch.Tensor:
    """L_nMSE, Eq. 5: -||z_u - z_r||^2 (the naive push of the Table 2 ablation). Mean over the batch."""
    return -((z_u - z_r) ** 2).sum(-1).mean()


def cvf_pull(z_u: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """L_CVF-pull, Eq. 6: 1 - cos(z_u, p_r^a), toward the anchor = mean reference IVR of the retain
    mini-batch. Mean over the batch."""
    return (1 - F.cosine_similarity(z_u, anchor.expand_as(z_u), dim=-1)).mean()


def identity_hinge(z: torch.Tensor, prototypes: torch.Tensor, margin: float) -> torch.Tensor:
    """L_ID (issue #10, "deep, not redirected"; not in the paper): mean over IVRs of
    max(0, cos(z_i, p_i) - margin), ``p_i`` the identity prototype of IVR i's person (both centred). Zero
    once no IVR keeps more than ``margin`` of its person's shared direction, wherever else it points."""
    return F.relu(F.cosine_similarity(z, prototypes, dim=-1) - margin).mean()


def stranger_profile_hinge(z: torch.Tensor, known: torch.Tensor, margin: float) -> torch.Tensor:
    """L_SP (issue #10, "make forget IVRs indistinguishable from strangers' under the reference model's own
    similarity"; not in the paper): mean over IVRs of max(0, max_k cos(z_i, p_k) - margin), ``p_k`` the
    identity prototypes of every person the model knows (the request's and the retain set's; all centred)
    and ``margin`` how close the reference model puts a stranger's photo to its nearest known person. Zero
    once no IVR is nearer to any known person, its own or another, than a stranger's photo is: L_ID
    (:func:`identity_hinge`) bounds the own prototype only, wherever else the IVR goes."""
    nearest = (F.normalize(z, dim=-1) @ F.normalize(known, dim=-1).T).max(-1).values
    return F.relu(nearest - margin).mean()


def shift_alignment(shifts: torch.Tensor) -> torch.Tensor:
    """L_DC (issue #10, "deep, not redirected"; not in the paper): mean over pairs i != j of
    cos(d_i, d_j)^2, ``d_i`` (n, d) one forget person's mean shift of their IVRs (unlearned minus reference).
    Zero when every person is moved along a direction of their own; 0 for fewer than two people."""
    n = shifts.shape[0]
    if n < 2:
        return shifts.new_zeros(())
    u = F.normalize(shifts, dim=-1)
    return ((u @ u.T).pow(2).sum() - n) / (n * (n - 1))


def cvf_loss(push: torch.Tensor, pull: torch.Tensor, lam: float) -> torch.Tensor:
    """L_CVF, Eq. 7: lambda * push + pull."""
    return lam * push + pull


def retention_mse(h_u: torch.Tensor, h_r: torch.Tensor) -> torch.Tensor:
    """L_RET, Eq. 9: (1/N) ||H_u - H_r||_F^2 with N the number of tokens (batch x tokens), i.e. the
    mean over tokens of each token's squared L2 distance to the reference model's token."""
    return ((h_u - h_r) ** 2).sum(-1).mean()


def calibration_output_change(b: torch.Tensor, gram: torch.Tensor, output: float, scaling: float) -> torch.Tensor:
    """How far one adapted layer's output moves on its calibration inputs, relative to the output itself:

        trace(dW C dW^T) / trace(W C W^T),  dW = s B A (Eq. 16),  so  trace(dW C dW^T) = s^2 trace(B (A C A^T) B^T)

    with C the layer's calibration covariance (Eq. 13), ``gram`` = A C A^T, ``output`` = trace(W C W^T) and
    ``scaling`` = s (LoRA alpha / r): the mean over calibration tokens x of ||dW x||^2 against that of ||W x||^2.
    AlphaEdit's preservation term (Fang et al., 2025, "AlphaEdit: null-space constrained knowledge editing",
    the error on the preserved keys K_0 with C = K_0 K_0^T) made relative; not in the paper, whose null space
    (Eq. 17-18) assumes A C A^T = 0."""
    return scaling**2 * ((b @ gram) * b).sum() / output


def total_loss(
    l_cvf: torch.Tensor, l_ret: torch.Tensor, l_gum: torch.Tensor, alpha: float, ret_weight: float
) -> torch.Tensor:
    """Eq. 11: alpha * L_CVF + beta * L_RET + L_GUM, ``ret_weight`` = beta (L_GUM, Eq. 10, is the
    retain answer NLL)."""
    return alpha * l_cvf + ret_weight * l_ret + l_gum


# -- the baselines' losses -----------------------------------------------------------------------
def ga_loss(nll_forget: torch.Tensor) -> torch.Tensor:
    """Gradient ascent (Thudi et al. 2022, "Unrolling SGD"): -NLL(forget)."""
    return -nll_forget


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024, "Negative preference optimization"):
    -(2/beta) * mean log sigmoid(-beta * (logp - logp_ref)), logp per-sequence summed, beta the
    inverse temperature. Equals (2/beta) log 2 where the model still equals the reference."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


def simnpo_loss(nll_sum: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, "Simplicity prevails"): -(2/beta) * mean log sigmoid(beta * (NLL_sum / |y|
    - delta)), beta the inverse temperature, delta the reward margin; reference-free."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_sum / lengths - delta)).mean()


def kl_divergence(
    logits_p: torch.Tensor, logits_q: torch.Tensor, vocab_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) per row (answer position), averaged over rows
    (= ``F.kl_div(log q, p, reduction="batchmean")`` on (positions, vocab)); KL_Min's retain term
    (Nguyen et al. 2020) and SIU's dual-masked KL (Li et al. 2024).

    ``vocab_keep`` (bool, vocab): drop the other columns and renormalise both distributions
    over the kept vocabulary (SIU's vocabulary mask). No rows gives 0.
    """
    if logits_p.shape[0] == 0:
        return logits_q.sum() * 0.0
    if vocab_keep is not None:
        logits_p, logits_q = logits_p[:, vocab_keep], logits_q[:, vocab_keep]
    log_p, log_q = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def fisher_mask(f_forget: torch.Tensor, f_preserve: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """MMUnlearner's weight-saliency mask (Huo et al. 2025), F_f / F_p >= threshold, written without the
    division (F_f >= threshold * F_p); entries with no forget saliency at all (F_f = 0) are masked out."""
    return (f_forget > 0) & (f_forget >= threshold * f_preserve)


MANU_STATS = ("mean_abs", "std", "rms", "freq")


def manu_scores(
    forget: Mapping[str, torch.Tensor],
    retain: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    eps: float = 1e-5,
) -> torch.Tensor:
    """MANU's neuron score (Liu et al. 2025, "Modality-aware neuron pruning for unlearning in MLLMs"):
    sum_s w_s * (I_s(D_f) / (I_s(D_r) + eps) - 1) over the activation statistics s of :data:`MANU_STATS`."""
    score = torch.zeros_like(forget[MANU_STATS[0]])
    for s in MANU_STATS:
        if weights[s]:
            score = score + weights[s] * (forget[s] / (retain[s] + eps) - 1)
    return score


def top_k_rows(scores: Mapping[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """MANU's pruning set: the rows (neurons) of the global top ``ceil(fraction * total)`` scores, per
    layer (sorted)."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    k = min(len(flat), max(1, math.ceil(fraction * len(flat))))
    chosen = torch.topk(flat, k).indices
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        rows = chosen[(chosen >= start) & (chosen < start + size)] - start
        if len(rows):
            out[n] = rows.sort().values
        start += size
    return out
