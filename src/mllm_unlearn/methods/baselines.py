"""The baselines the paper compares against (Sec. 4.1, App. D.2, D.4), one small class per method.

Every class only defines its loss (or, for MANU, its one-off weight edit); the driver
(:mod:`mllm_unlearn.train.unlearn`) puts LoRA on the update scope and runs the shared loop. The
math of each loss is a pure tensor function at the top of this module, tested on hand-made tensors.

Notation: NLL(D) = mean answer-token negative log-likelihood of a batch of D (labels on the answer
only); logp(y|x) = per-sequence SUMMED answer log-probability; "ref" = the model before unlearning,
i.e. the same model with its adapters disabled (:func:`~mllm_unlearn.nullspace.reference_model`).

Shared choices (see ``shared/reference/baselines.md``):

- Scope and subspace: LoRA on the LLM (``default_scope = "llm"``) and plain LoRA
  (``default_subspace = "none"``), as the public codes, except MMUnlearner and MANU whose papers
  edit the vision side and the LLM (``all``). ``--scope visual`` gives App. D.2's variants.
- Learning rate ``BASELINE_LR = 1e-3``. The public configs use 1e-5..2e-5 for 7B models, and the
  same rate as their memorisation fine-tune (MLLMU-Bench: 2e-5 for both). Our tiny models are
  memorised at 1e-3 (``experiments/demo.py``), so the same relation gives 1e-3; 2e-5 would move a
  tiny model's LoRA by ~1e-2 per coordinate in 300 Adam steps, i.e. not at all. For real 7B
  checkpoints pass ``--lr 2e-5``. Nothing was tuned for any method.
- Forget data: every training pair of the forget people (questions with and without the image,
  ``forget_modality="all"``), as the public codes unlearn the forget split's fine-tune data;
  ``vqa`` / ``qa`` restrict it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.sample import Sample
from ..models.base import Batch
from ..models.loading import LoadedModel, load_model
from ..nullspace import lora_layers, reference_model, target_linears, trainable_parameters, unused_layers
from .base import UnlearnContext, UnlearningMethod, distinct_images, register

BASELINE_LR = 1e-3
MODALITIES = ("all", "vqa", "qa")
KL_DIRECTIONS = ("ref_theta", "theta_ref")


# ---------------------------------------------------------------------------------------------
# Pure loss math (hand-testable)
# ---------------------------------------------------------------------------------------------
def ga_loss(nll_forget: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: -NLL(forget)."""
    return -nll_forget


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: -(2/beta) * mean log sigmoid(-beta * (logp - logp_ref)), logp per-sequence summed.
    Equals (2/beta) log 2 where the model still equals the reference."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


def simnpo_loss(nll_sum: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """SimNPO: -(2/beta) * mean log sigmoid(beta * (NLL_sum / |y| - delta)); reference-free."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_sum / lengths - delta)).mean()


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor,
                  vocab_keep: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) per row (answer position), averaged over rows
    (= ``F.kl_div(log q, p, reduction="batchmean")`` on (positions, vocab)).

    ``vocab_keep`` (bool, vocab): drop the other columns and renormalise both distributions
    over the kept vocabulary (SIU's vocabulary mask). No rows gives 0.
    """
    if logits_p.shape[0] == 0:
        return logits_q.sum() * 0.0
    if vocab_keep is not None:
        logits_p, logits_q = logits_p[:, vocab_keep], logits_q[:, vocab_keep]
    log_p, log_q = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                     n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence SUMMED log-probability of the answer tokens and the answer lengths |y|.
    ``logits``/``targets``/``rows`` are answer positions as :meth:`ArchAdapter.answer_logits` gives them."""
    tok = -F.cross_entropy(logits.float(), targets, reduction="none")
    logp = torch.zeros(n, device=tok.device, dtype=tok.dtype).index_add(0, rows, tok)
    return logp, torch.bincount(rows, minlength=n).to(tok.dtype)


def fisher_mask(f_forget: torch.Tensor, f_preserve: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """MMUnlearner's saliency mask, F_f / F_p >= threshold, written without the division
    (F_f >= threshold * F_p); entries with no forget saliency at all (F_f = 0) are masked out."""
    return (f_forget > 0) & (f_forget >= threshold * f_preserve)


MANU_STATS = ("mean_abs", "std", "rms", "freq")


def manu_scores(forget: Mapping[str, torch.Tensor], retain: Mapping[str, torch.Tensor],
                weights: Mapping[str, float], eps: float = 1e-5) -> torch.Tensor:
    """MANU's neuron score: sum_s w_s * (I_s(D_f) / (I_s(D_r) + eps) - 1) over the statistics s."""
    score = torch.zeros_like(forget[MANU_STATS[0]])
    for s in MANU_STATS:
        if weights[s]:
            score = score + weights[s] * (forget[s] / (retain[s] + eps) - 1)
    return score


def top_k_rows(scores: Mapping[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """The rows (neurons) of the global top ``ceil(fraction * total)`` scores, per layer (sorted)."""
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


@torch.no_grad()
def prune_rows(model: torch.nn.Module, rows: Mapping[str, Sequence[int] | torch.Tensor],
               zero_bias: bool = False) -> None:
    """Zero the weight rows (output neurons) ``rows[path]`` of the Linears at those module paths
    (paths of the plain model; LoRA-wrapped layers are edited in their base layer). Re-applies a
    saved MANU mask to a freshly loaded model."""
    layers = target_linears(model, "|".join(map(re.escape, rows)))
    for path, idx in rows.items():
        idx = torch.as_tensor(idx, dtype=torch.long)
        layers[path].weight[idx] = 0
        if zero_bias and layers[path].bias is not None:
            layers[path].bias[idx] = 0


# ---------------------------------------------------------------------------------------------
# Model-side helpers shared by the methods
# ---------------------------------------------------------------------------------------------
def encode_pairs(lm: LoadedModel, samples: Sequence[Sample]) -> Batch:
    """Question + answer batch (labels on the answer tokens only), on the model's device."""
    return lm.arch.encode(lm.processor, samples, [s.question for s in samples],
                          [s.answer for s in samples]).to(lm.model.device)


def subsample(samples: Sequence[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` of the samples (0 = all), drawn with a seeded generator."""
    samples = list(samples)
    return random.Random(seed).sample(samples, limit) if 0 < limit < len(samples) else samples


def select(samples: Sequence[Sample], modality: str) -> list[Sample]:
    """The samples of a modality (``vqa``: with the image, ``qa``: text only, ``all``)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
    return [s for s in samples if modality == "all" or s.modality == modality]


@dataclass
class BaselineConfig:
    forget_modality: str = "all"  # which forget training pairs to unlearn on: all | vqa | qa

    def __post_init__(self) -> None:
        if self.forget_modality not in MODALITIES:
            raise ValueError(f"forget_modality must be one of {MODALITIES}, not {self.forget_modality!r}")


class Baseline(UnlearningMethod):
    """Shared plumbing: the forget / retain batch streams and the reference model's logits.

    With a visual-only update scope (``visual``, ``projector``) text-only pairs never reach the
    adapters: their NLL is a constant (a batch of them would have no gradient at all), so the
    streams then keep only the pairs asked with the image.
    """

    config_class = BaselineConfig
    default_scope = "llm"
    default_subspace = "none"
    default_lr = BASELINE_LR
    #: a separately loaded reference model (NPO's ``reference_model_path``); None = adapters disabled
    ref_lm: LoadedModel | None = None
    #: set by :meth:`setup`: every adapter is in the vision tower / projector
    visual_only: bool = False

    def setup(self, ctx: UnlearnContext) -> None:
        visual = f"(?:{ctx.lm.arch.vision_pattern})|(?:{ctx.lm.arch.projector_pattern})"
        self.visual_only = all(re.fullmatch(visual, n) for n in lora_layers(ctx.lm.model))

    def pairs(self, samples: Sequence[Sample], modality: str = "all") -> list[Sample]:
        """The samples of ``modality`` that can carry a gradient under the update scope."""
        if self.visual_only and modality == "qa":
            raise ValueError("text-only pairs cannot reach adapters on the visual module only")
        return select(samples, "vqa" if self.visual_only else modality)

    def forget_batch(self, ctx: UnlearnContext) -> list[Sample]:
        mod = self.cfg.forget_modality
        return ctx.stream(f"forget_{mod}", lambda: self.pairs(ctx.forget, mod))

    def retain_batch(self, ctx: UnlearnContext) -> list[Sample]:
        return ctx.stream("retain", lambda: self.pairs(ctx.retain))

    def reference_logits(self, ctx: UnlearnContext, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Answer logits, targets and rows of the reference model (no gradient)."""
        with torch.no_grad():
            if self.ref_lm is not None:
                return ctx.lm.arch.answer_logits(self.ref_lm.model, batch)
            with reference_model(ctx.lm.model):
                return ctx.lm.arch.answer_logits(ctx.lm.model, batch)


def _retain_term(ctx: UnlearnContext, method: Baseline, weight: float) -> torch.Tensor:
    return weight * ctx.nll(method.retain_batch(ctx)) if weight else torch.zeros((), device=ctx.lm.model.device)


# ---------------------------------------------------------------------------------------------
# Gradient-based baselines
# ---------------------------------------------------------------------------------------------
@register
class GA(Baseline):
    """Gradient ascent (Thudi et al. 2022, "Unrolling SGD"): loss = -NLL(forget).

    Unbounded below: at a high learning rate the model collapses to gibberish (reported by users of
    the public codes); nothing here prevents it, as nothing in the public codes does.
    """

    name = "ga"

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        nll_f = ctx.nll(self.forget_batch(ctx))
        return ga_loss(nll_f), {"forget_nll": nll_f.item()}


@dataclass
class GADiffConfig(BaselineConfig):
    alternate: bool = False  # True: even steps -NLL(forget), odd steps NLL(retain) (MLLMU-Bench's code)
    retain_weight: float = 1.0


@register
class GADiff(Baseline):
    """Gradient difference (Liu et al. 2022, "Continual learning and private unlearning"):
    loss = -NLL(forget) + w * NLL(retain), w = 1.

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
    """KL minimisation (Nguyen et al. 2020, "Variational Bayesian unlearning"; MLLMU-Bench's KL_Min):
    loss = -NLL(forget) + NLL(retain) + KL(p_ref || p_theta) on the retain batch's answer positions.

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
        kl = (kl_divergence(ref_logits, logits) if self.cfg.kl_direction == "ref_theta"
              else kl_divergence(logits, ref_logits))
        loss = ga_loss(nll_f) + self.cfg.retain_weight * nll_r + self.cfg.kl_weight * kl
        return loss, {"forget_nll": nll_f.item(), "retain_nll": nll_r.item(), "kl": kl.item()}


@dataclass
class NPOConfig(BaselineConfig):
    beta: float = 0.1
    retain_weight: float = 1.0  # 0 gives pure NPO (forget term only)
    reference_model_path: str = ""  # "" = adapters disabled; else a checkpoint (e.g. a retain-only model)


@register
class NPO(Baseline):
    """Negative preference optimisation (Zhang et al. 2024):
    loss = -(2/beta) * mean log sigmoid(-beta * (logp_theta(y|x) - logp_ref(y|x))) on forget
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
        retain_term = _retain_term(ctx, self, self.cfg.retain_weight)
        return forget_term + retain_term, {"npo": forget_term.item(), "retain_nll": retain_term.item(),
                                           "logratio": (logp - logp_ref).mean().item()}


@dataclass
class SimNPOConfig(BaselineConfig):
    beta: float = 4.5
    delta: float = 0.0
    retain_weight: float = 1.0


@register
class SimNPO(Baseline):
    """SimNPO (Fan et al. 2024, "Simplicity prevails"), an extra baseline:
    loss = -(2/beta) * mean log sigmoid(beta * (NLL_sum(y|x)/|y| - delta)) + w * NLL(retain),
    beta = 4.5, delta = 0 (open-unlearning's defaults). Reference-free: the length-normalised NLL
    replaces NPO's log-ratio. w = 1 as for NPO (open-unlearning also weights the forget term by
    gamma = 0.125; we keep it at 1 like the other baselines' forget terms).
    """

    name = "simnpo"
    config_class = SimNPOConfig

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        forget = self.forget_batch(ctx)
        logp, lengths = sequence_logprob(*ctx.lm.arch.answer_logits(ctx.lm.model, encode_pairs(ctx.lm, forget)),
                                         len(forget))
        forget_term = simnpo_loss(-logp, lengths, self.cfg.beta, self.cfg.delta)
        retain_term = _retain_term(ctx, self, self.cfg.retain_weight)
        return forget_term + retain_term, {"simnpo": forget_term.item(), "retain_nll": retain_term.item()}


# ---------------------------------------------------------------------------------------------
# MMUnlearner
# ---------------------------------------------------------------------------------------------
@dataclass
class MMUnlearnerConfig(BaselineConfig):
    forget_modality: str = "vqa"
    threshold: float = 1.0  # mask = F_f / F_p >= threshold
    preserve_forget_text: bool = True  # the preserve set holds the forget people's text-only pairs too
    fisher_samples: int = 256  # at most this many samples per set for the Fisher estimate (0 = all)


@register
class MMUnlearner(Baseline):
    """MMUnlearner (Huo et al. 2025): geometry-constrained gradient ascent with a weight-saliency mask.

    Setup: diagonal Fisher (squared gradients, averaged over batches) of the forget NLL, F_f, and of
    a preserve-set NLL, F_p, w.r.t. the trainable parameters; mask = F_f / F_p >= threshold (1).
    Training alternates by step parity: even steps are forget steps, loss -NLL(forget) with the
    gradient multiplied by the mask (parameter hooks registered here; the loop then clips the
    gradient norm to 1.0, as the public code), odd steps plain NLL(preserve).

    Choices:
    - Data: MMUnlearner forgets the *visual* pattern of a concept while keeping its textual
      knowledge, so D_f = the forget people's questions with the image (``forget_modality="vqa"``)
      and the preserve set = retain pairs + the forget people's text-only pairs
      (``preserve_forget_text``).
    - Scope ``all`` by default: the paper masks the vision tower + projector and the LLM (a vision
      mask and a language mask; with one global threshold they are the same rule). ``llm`` would
      reduce it to a language-only SalUn; App. D.2's variant is ``--scope visual``.
    - With LoRA the mask is over the LoRA parameters' gradients, not the base weights (the public
      code masks full weights). LoRA starts with B = 0, so every A has zero gradient when the mask
      is computed: F_f = 0 there and A is masked out of the forget steps (it still trains on the
      preserve steps); the forget steps move B where the forget saliency dominates.
    - One AdamW serves both step kinds, so a masked-out weight can still drift on a forget step
      from the momentum of earlier preserve steps; its forget *gradient* is zero.
    """

    name = "mmunlearner"
    config_class = MMUnlearnerConfig
    default_scope = "all"

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.masks: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._masking = False

    def preserve(self, ctx: UnlearnContext) -> list[Sample]:
        forget_text = self.cfg.preserve_forget_text and not self.visual_only
        return self.pairs(ctx.retain) + (select(ctx.forget, "qa") if forget_text else [])

    def _fisher(self, ctx: UnlearnContext, params: dict[str, torch.nn.Parameter],
                samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        samples = subsample(samples, self.cfg.fisher_samples, ctx.seed)
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        n_batches = 0
        for i in range(0, len(samples), ctx.batch_size):
            grads = torch.autograd.grad(ctx.nll(samples[i:i + ctx.batch_size]), list(params.values()),
                                        allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    fisher[n] += g.detach() ** 2
            n_batches += 1
        return {n: f / max(1, n_batches) for n, f in fisher.items()}

    def setup(self, ctx: UnlearnContext) -> None:
        super().setup(ctx)
        for handle in self._handles:  # a new forget request (continual mode) gets a new mask
            handle.remove()
        self._handles, self._masking = [], False
        trainable = {id(p) for p in trainable_parameters(ctx.lm.model)}
        params = {n: p for n, p in ctx.lm.model.named_parameters() if id(p) in trainable}
        forget = self.pairs(ctx.forget, self.cfg.forget_modality)
        f_forget = self._fisher(ctx, params, forget)
        f_preserve = self._fisher(ctx, params, self.preserve(ctx))
        self.masks = {n: fisher_mask(f_forget[n], f_preserve[n], self.cfg.threshold).to(p.dtype)
                      for n, p in params.items()}
        for n, p in params.items():
            self._handles.append(p.register_hook(lambda g, m=self.masks[n]: g * m if self._masking else g))
        self.mask_fraction = (sum(m.sum().item() for m in self.masks.values())
                              / sum(m.numel() for m in self.masks.values()))

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self._masking = step % 2 == 0  # read by the hooks during the loop's backward of this loss
        if self._masking:
            nll_f = ctx.nll(self.forget_batch(ctx))
            return ga_loss(nll_f), {"forget_nll": nll_f.item(), "mask_fraction": self.mask_fraction}
        nll_p = ctx.nll(ctx.stream("preserve", lambda: self.preserve(ctx)))
        return nll_p, {"preserve_nll": nll_p.item(), "mask_fraction": self.mask_fraction}


# ---------------------------------------------------------------------------------------------
# MANU
# ---------------------------------------------------------------------------------------------
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
        return {"mean_abs": self.abs / self.n, "std": (msq - mean ** 2).clamp_min(0).sqrt(),
                "rms": msq.sqrt(), "freq": self.freq / self.n}


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
    """MANU, modality-aware neuron unlearning (Liu et al. 2025): pruning, no training.

    Neurons are the output rows of the targeted Linears: the MLP layers (``layers`` regex) inside
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

    Saving: the zeroed rows are in the base weights, which the saved PEFT adapter does not carry.
    Because the edit is pure row-zeroing, it is fully described by ``self.pruned`` ({module path:
    row indices}); save it next to the adapter and re-apply it with :func:`prune_rows` after
    loading (or save merged weights).
    """

    name = "manu"
    config_class = MANUConfig
    default_scope = "all"
    trains = False

    def _limit(self, ctx: UnlearnContext, samples: Sequence[Sample]) -> list[Sample]:
        return subsample(samples, self.cfg.max_samples, ctx.seed)

    def _measure(self, ctx: UnlearnContext, layers: Mapping[str, torch.nn.Linear], samples: Sequence[Sample],
                 images: bool) -> dict[str, dict[str, torch.Tensor]]:
        lm = ctx.lm
        if not samples:
            raise ValueError(f"MANU needs {'images' if images else 'text-only pairs'} of both the forget "
                             "and the retain people")
        stats = {n: _ActivationStats(layer.out_features, self.cfg.freq_threshold) for n, layer in layers.items()}
        token_mask: list[torch.Tensor | None] = [None]

        def hook_for(name: str):
            def hook(module, args, out):
                stats[name].add(out if token_mask[0] is None else out[token_mask[0]])
            return hook

        handles = [layer.register_forward_hook(hook_for(n)) for n, layer in layers.items()]
        try:
            for i in range(0, len(samples), ctx.batch_size):
                chunk = samples[i:i + ctx.batch_size]
                if images:
                    batch = lm.arch.encode(lm.processor, chunk, [""] * len(chunk)).to(lm.model.device)
                    lm.arch.image_features(lm.model, batch.inputs)
                else:
                    batch = encode_pairs(lm, chunk)
                    token_mask[0] = batch.inputs["attention_mask"].bool()
                    lm.model.get_base_model().model(**batch.inputs)
        finally:
            for h in handles:
                h.remove()
        return {n: s.result() for n, s in stats.items()}

    def apply(self, ctx: UnlearnContext) -> dict[str, float]:
        cfg, lm = self.cfg, ctx.lm
        # the update scope is where the driver put LoRA (its B = 0: the adapter is not used)
        layers = {n: m.get_base_layer() for n, m in lora_layers(lm.model).items() if re.fullmatch(cfg.layers, n)}
        if not layers:
            raise ValueError(f"MANU: no Linear of the update scope matches layers={cfg.layers!r}")
        visual_re = f"(?:{lm.arch.vision_pattern})|(?:{lm.arch.projector_pattern})"
        vision = {n: m for n, m in layers.items() if re.fullmatch(visual_re, n)}
        text = {n: m for n, m in layers.items() if n not in vision}
        weights = {"mean_abs": cfg.w_mean_abs, "std": cfg.w_std, "rms": cfg.w_rms, "freq": cfg.w_freq}
        self.scores: dict[str, torch.Tensor] = {}
        was_training = lm.model.training
        lm.model.eval()
        with torch.no_grad():
            if vision:
                f_img = self._limit(ctx, distinct_images(ctx.forget))
                r_img = self._limit(ctx, distinct_images(ctx.retain))
                probe = lm.arch.encode(lm.processor, r_img[:4], [""] * len(r_img[:4])).to(lm.model.device).inputs
                with torch.enable_grad():
                    dead = set(unused_layers(lm.model, vision, probe,
                                             features=lambda m, x: lm.arch.image_features(m, dict(x))))
                vision = {n: m for n, m in vision.items() if n not in dead}
                sf, sr = self._measure(ctx, vision, f_img, True), self._measure(ctx, vision, r_img, True)
                self.scores.update({n: manu_scores(sf[n], sr[n], weights) for n in vision})
            if text:
                f_txt = self._limit(ctx, select(ctx.forget, "qa"))
                r_txt = self._limit(ctx, select(ctx.retain, "qa"))
                sf, sr = self._measure(ctx, text, f_txt, False), self._measure(ctx, text, r_txt, False)
                self.scores.update({n: manu_scores(sf[n], sr[n], weights) for n in text})
        lm.model.train(was_training)
        rows = top_k_rows(self.scores, cfg.prune_fraction)
        prune_rows(lm.model, rows, cfg.zero_bias)
        self.pruned = {n: r.tolist() for n, r in rows.items()}
        n_pruned = sum(len(r) for r in rows.values())
        return {"pruned": float(n_pruned), "layers_pruned": float(len(rows)),
                "min_pruned_score": float(min(self.scores[n][r].min().item() for n, r in rows.items()))}


# ---------------------------------------------------------------------------------------------
# SIU (adapted)
# ---------------------------------------------------------------------------------------------
_CAPITALISED = re.compile(r"\b[A-Z][A-Za-z\-]+")


def person_names(samples: Sequence[Sample], min_fraction: float = 0.5) -> dict[str, list[str]]:
    """Each person's name words, found in the data: capitalised words that occur in at least
    ``min_fraction`` of that person's text-only questions and in no question of anyone else
    (text-only questions name the person: "What is Ana Lind's job?"), in order of appearance."""
    def words(s: Sample) -> list[str]:
        return list(dict.fromkeys(_CAPITALISED.findall(s.question.replace("'s", ""))))

    people_of: dict[str, set[str]] = {}
    for s in samples:
        for w in words(s):
            people_of.setdefault(w, set()).add(s.person)
    names = {}
    for person in dict.fromkeys(s.person for s in samples):
        text_qs = [words(s) for s in samples if s.person == person and s.image is None]
        counts: dict[str, int] = {}
        for q in text_qs:
            for w in q:
                if people_of[w] == {person}:
                    counts[w] = counts.get(w, 0) + 1
        names[person] = [w for w, c in counts.items() if c >= min_fraction * len(text_qs)]
    return names


def _rename(text: str, old: Sequence[str], new: str) -> str:
    """Replace the full name ``old`` (words) and any single word of it by the words of ``new``."""
    if not old:
        return text
    new_words = new.split()
    text = text.replace(" ".join(old), new)
    for i, w in enumerate(old):
        text = re.sub(rf"\b{re.escape(w)}\b", new_words[min(i, len(new_words) - 1)], text)
    return text


def name_token(tokenizer: Any, word: str) -> int:
    """The token that starts ``word`` inside a sentence: the first non-blank token of " " + word.
    Later pieces of a name (and a lone leading-space token) are shared with many other words."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return next((i for i in ids if tokenizer.decode([i]).strip()), ids[0])


def _question_words(q: str) -> set[str]:
    return set(re.findall(r"\w+", q.lower()))


@dataclass
class SIUConfig(BaselineConfig):
    identity: str = "donor"  # donor: a retain person's answers under an unseen name; fixed: fixed_answer
    unseen_name: str = "Robin Vale"
    fixed_answer: str = "This is {name}."
    kl_weight: float = 1.0
    single_image: bool = False  # True: only the questions on one photo per forget person (SIU's setting)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.identity not in ("donor", "fixed"):
            raise ValueError(f"identity must be 'donor' or 'fixed', not {self.identity!r}")


@register
class SIU(Baseline):
    """SIU, Single Image Unlearning (Li et al., NeurIPS 2024), adapted to entity-level forgetting
    (App. D.4 reports it as an adapted baseline too). No public code; built from the paper.

    Fine-tune on multifaceted data made from the forget samples, with
    loss = CE(multifaceted batch) + kl_weight * DMK, DMK = KL(p_ref || p_theta) over the answer
    positions kept by a token mask, on a vocabulary without the targets' name tokens (renormalised):

    (a) "align with an unseen concept / assign a new visual description": the forget people's
        questions *with the image*, their answers replaced by an unseen identity's. ``identity=donor``
        (default): each forget person gets a seeded random retain "donor"; each question takes the
        donor's answer to its most similar image question (word overlap; identical questions in
        MLLMU-style data), with the donor's name replaced by ``unseen_name`` — a consistent unseen
        identity (new name, plausible attributes). ``identity=fixed``: every answer is
        ``fixed_answer`` (default "This is Robin Vale.").
    (b) "decouple factual knowledge": the forget people's text-only pairs with their true answers.
    (c) "preserve non-targeted knowledge": the retain people's pairs.
    Token mask: on (a), answer positions whose target token is not in the original answer's tokens
    (the new, contradicting tokens) are left out of the KL; (b) and (c) keep every position.
    Vocabulary mask: the token that starts each of the forget people's name words (:func:`name_token`;
    the later pieces of a name are shared with other words) is dropped from both distributions.

    Simplifications, plainly:
    - SIU unlearns one concept from ONE image in a few steps; here every forget person and, by
      default, all its training photos are used (``single_image=True``: one photo per person).
    - SIU's four targets become three data groups; (a) merges its first two. SIU builds its data
      with the original model's descriptions / GPT-made text; we derive it from the benchmark's
      own QA by string replacement.
    - Names are not in the data: :func:`person_names` finds them in the text-only questions.
    - The KL is KL(p_ref || p_theta) averaged over kept positions; CE is the mean token NLL of
      the concatenated (a)+(b)+(c) batch (one batch of each group per step); weights 1.
    """

    name = "siu"
    config_class = SIUConfig

    def setup(self, ctx: UnlearnContext) -> None:
        super().setup(ctx)
        cfg, tok = self.cfg, ctx.lm.processor.tokenizer
        names = person_names(list(ctx.forget) + list(ctx.retain))
        rng = random.Random(ctx.seed)
        retain_vqa: dict[str, list[Sample]] = {}
        for s in select(ctx.retain, "vqa"):
            retain_vqa.setdefault(s.person, []).append(s)
        forget_vqa = select(ctx.forget, "vqa")
        if cfg.single_image:
            first = {}
            for s in forget_vqa:
                first.setdefault(s.person, s.image.data)
            forget_vqa = [s for s in forget_vqa if s.image.data == first[s.person]]
        if not forget_vqa or (cfg.identity == "donor" and not retain_vqa):
            raise ValueError("SIU needs forget questions with images (and retain ones for identity=donor)")
        donors = {p: rng.choice(sorted(retain_vqa)) for p in sorted({s.person for s in forget_vqa})}
        self.relabelled, self.original_tokens = [], {}
        for s in forget_vqa:
            if cfg.identity == "fixed":
                answer = cfg.fixed_answer.format(name=cfg.unseen_name)
            else:
                d = donors[s.person]
                qw = _question_words(s.question)
                match = max(retain_vqa[d], key=lambda r: len(qw & _question_words(r.question))
                            / max(1, len(qw | _question_words(r.question))))
                answer = _rename(match.answer, names.get(d, []), cfg.unseen_name)
            new = dataclasses.replace(s, id=f"{s.id}/siu", answer=answer)
            self.relabelled.append(new)
            arch = ctx.lm.arch
            self.original_tokens[new.id] = set(tok(arch.answer_prefix + s.answer.strip(),
                                                   add_special_tokens=False)["input_ids"])
            self.original_tokens[new.id].add(arch.eos_token_id(tok))
        name_ids = {name_token(tok, w) for p in {s.person for s in ctx.forget} for w in names.get(p, [])}
        vocab = ctx.lm.model.get_base_model().lm_head.out_features
        self.vocab_keep = torch.ones(vocab, dtype=torch.bool, device=ctx.lm.model.device)
        self.vocab_keep[sorted(i for i in name_ids if i < vocab)] = False
        self.name_words = {p: names.get(p, []) for p in {s.person for s in ctx.forget}}

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        a = ctx.stream("siu_relabelled", lambda: self.relabelled)
        b = ctx.stream("forget_qa", lambda: select(ctx.forget, "qa"))
        c = self.retain_batch(ctx)
        samples = a + b + c
        batch = encode_pairs(ctx.lm, samples)
        logits, targets, rows = ctx.lm.arch.answer_logits(ctx.lm.model, batch)
        ref_logits, _, _ = self.reference_logits(ctx, batch)
        keep = torch.ones_like(targets, dtype=torch.bool)
        for i, s in enumerate(a):  # token mask: the new tokens of the relabelled answers
            at = rows == i
            keep[at] = torch.tensor([t in self.original_tokens[s.id] for t in targets[at].tolist()],
                                    dtype=torch.bool, device=keep.device)
        ce = F.cross_entropy(logits.float(), targets)
        dmk = kl_divergence(ref_logits[keep], logits[keep], self.vocab_keep)
        return ce + self.cfg.kl_weight * dmk, {"ce": ce.item(), "dmk": dmk.item(),
                                               "kl_positions": keep.float().mean().item()}
