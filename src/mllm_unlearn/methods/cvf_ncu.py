"""CVF-NCU: contrastive visual forgetting (Sec. 3.1) trained inside the null space of the retain set's
activations (Sec. 3.2-3.3). The null-space LoRA itself is set up by the driver (``default_subspace``);
this class only defines the loss, Eq. 11:

    alpha * (lambda * L_push + L_pull) + beta * L_RET + L_GUM      (beta: ``ret_weight``)

Choices the paper leaves open (Sec. 3.1 does not fix them), each an option here:

- ``queue_source``: the negative queue Q of Eq. 4 holds reference IVRs of *retain* images from
  previous steps (default). Holding the forget images' own reference IVRs (``forget``) puts
  near-copies of z_f^r among the negatives when few people are forgotten, so the push contradicts
  itself; retain negatives agree with the pull toward the retain anchor.
- ``center``: pooled IVRs of different images share a large common component (cosine near 1), so
  Eq. 4 sees tiny differences. With ``center`` the push compares IVRs after subtracting the mean
  reference IVR of the retain set (computed once in :meth:`setup`). The pull (Eq. 6) is left
  uncentred: its anchor is itself a retain mean, which centring would reduce to noise.
- ``level``: ``pooled`` applies Eq. 4 and Eq. 6 to mean-pooled IVRs (Eq. 2, the paper's text);
  ``token`` treats every visual token as its own IVR (g = identity): each forget token is pushed
  from its own reference token against a queue of retain tokens, and pulled toward the retain
  batch's mean token *at the same position*. The LLM reads the tokens, not their mean: a pooled
  IVR can leave its reference while the tokens still carry the identity.
- ``push``: ``cvf`` (Eq. 4), ``nmse`` (Eq. 5, Table 2's ablation) or ``none``; ``pull``, ``ret``,
  ``gum`` switch Eq. 6, 9, 10 off for the Table 2 ablations.

Beyond the paper (issue #10; every option measured on dev worlds 0-2, docs/method.md):

- ``relearn_sim`` (on): a simulated relearning step every ``relearn_sim_every``-th step — first-order
  meta-unlearning (MAML's first-order variant, Finn et al. 2017; TAR, Tamirisa et al. 2024) that keeps
  half of the forget people forgotten at weights an attacker moved to relearn the other half
  (:meth:`CVFNCU._relearn_sim`). Its sign step makes the step sensitive to last-bit differences of its
  gradient (another thread count, several processes): same seed and threads, same bytes, as always.
  The audit's relearning comes back through the vision tower (``audit --relearn-scope``), the weights
  this step attacks; a longer simulated attack (``relearn_sim_steps``, ``relearn_sim_lr``) did not
  lower it further.
- ``view_pool`` (on): four copies of each forget photo, weakly augmented (``augment``), made once per
  request, join the photos in the push / pull: forget the person, not the photos.
- ``decorrelate`` (on, L_DC): each forget person's IVR shift along a direction of their own, so that a
  relearning fine-tune that undoes the shift for some people does not undo it for the others.
- ``push_floor`` (0.01): each token's Eq. 4 term t enters as log(t + 0.01), so a token that already resembles
  retain tokens keeps being pushed (Eq. 4's gradient dies with its term); with beta (``ret_weight``) 3,
  which holds the other faces' tokens against the larger edit.
- ``ret_strangers`` (on): L_RET also on 4 strangers' photos a step (12 retain pairs instead of 16, so a
  step encodes as many images): faces outside the retain set keep their tokens.
- Strangers (off): pull toward strangers' IVRs (``anchor``), one impostor stranger per forget person
  and L_SR (``stranger_reply``: the answer NLL of the reference model's reply about that stranger);
  per-step augmented views (``views``), a push at a middle vision block (``mid_push``), ``b_l2``. (The
  stranger photos also shape the null space by default: ``UnlearnConfig.calibrate_strangers``.)

Cost of a step: the reference model's tokens of every image are computed once per request
(:meth:`UnlearnContext.cache_reference`; the retain images' come free from NCU calibration), the
retain pairs are encoded once, and L_GUM reads the retain batch's projector outputs h_ru instead of
running the visual module again: the visual module runs once per step on the forget batch and once on
the retain batch (12 pairs) and the 4 stranger photos of ``ret_strangers`` (before: six passes, three of
them on the retain images), and every 8th step twice more on 4 photos each for ``relearn_sim``. The loss
is the same function; its gradient is summed in another order (L_GUM's and L_RET's meet at h_ru), so B differs
from the old code's in the last bits after one step and, as Adam amplifies rounding in B's near-zero
gradient entries, by up to ~17% of max|B| after 200 steps on the demo (relative norm 5%, logged losses
within 2e-5) — exactly what the old code differs from itself run with 2 threads instead of 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..data.augment import augment_pixels, augmented_copies
from ..data.sample import Sample
from ..models.base import block_outputs
from ..models.scoring import eval_mode, generate
from ..nullspace import base_weights, calibration_terms, reference_model, trainable_parameters
from ..nullspace.reference import image_key
from ..runtime import distributed
from ..runtime.distributed import gather
from .base import UnlearnContext, UnlearningMethod, distinct_images, register
from .losses import (
    calibration_output_change,
    cvf_loss,
    cvf_pull,
    cvf_push,
    identity_hinge,
    nmse_push,
    pool,
    retention_mse,
    shift_alignment,
    stranger_profile_hinge,
    total_loss,
)

PUSHES = ("cvf", "nmse", "none")
LEVELS = ("pooled", "token")
ANCHORS = ("retain", "stranger", "stranger_pair", "stranger_person")
PUSH_TARGETS = ("photo", "person")


def person_means(x: torch.Tensor, people: list[str]) -> dict[str, torch.Tensor]:
    """The mean of ``x``'s rows (one per image) over each person's, by name in sorted order."""
    return {p: x[[q == p for q in people]].mean(0) for p in sorted(set(people))}


@dataclass
class CVFConfig:
    """Defaults: see docs/method.md for the measurements behind each (chosen on development worlds 0-2,
    confirmed on development worlds 9-11 or, since the seventeenth pass, 12-14; reported on held-out worlds
    3-5). Of the options added for issue #10, the simulated relearning step (``relearn_sim``), a pool of four
    weakly augmented copies of each forget photo (``view_pool``, ``augment``), L_RET on strangers' photos
    (``ret_strangers``), L_DC (``decorrelate``) and the floor under Eq. 4 (``push_floor``, with beta =
    ``ret_weight`` 3) are on, with the driver's NCU calibration on stranger photos
    (``CVFNCU.calibrate_strangers``); the stranger anchors and L_SR, per-step
    ``views``, the middle-block push, the ||B|| penalty, the person and focal pushes, L_ID (``identity_push``,
    ``identity_meta``), L_SP (``stranger_profile``) and a longer simulated attack (``relearn_sim_steps``) are
    off: none improved unseen-photo forgetting or robustness to relearning without costing the other or
    real-world VQA (L_ID came closest: see its field). ``keep_forgotten`` is on: it only acts in continual
    unlearning without replay.

    The first defaults were chosen on the demo world (forget_15, 200 steps at lr 3e-2: forget VQA
    1.00 -> 0.25 = chance, retain VQA 0.995 -> 0.995, real VQA 0.99 -> 0.91; alpha 3 / 5 / 10 all reach
    chance, larger alpha costs real-world VQA). The paper's literal reading is the registered method
    ``cvf_ncu_paper`` (:class:`PaperCVFConfig`)."""

    alpha: float = 5.0  # weight of L_CVF (Eq. 11)
    #: beta of Eq. 11: the weight of L_RET. 3 since the twenty-second pass, with ``push_floor=0.01`` (2 since the
    #: seventeenth, with ``decorrelate=1`` and ``view_pool=4``; 1 before): over three draws on dev worlds 0-2 and
    #: 12-14, beta 3 beside the floor gave Real-world VQA 0.971 (beta 2: 0.969), relearning recovery 0.062
    #: (0.079) and int4 retain ratio 0.983 (0.967); beta 4: 0.970, 0.100, 0.987 (docs/method.md)
    ret_weight: float = 3.0
    lam: float = 1.0  # lambda: push vs pull inside L_CVF (Eq. 7)
    tau: float = 0.07  # temperature of Eq. 3
    queue_size: int = 256  # reference IVRs kept as negatives (Eq. 4)
    queue_source: str = "retain"
    center: bool = True
    level: str = "token"
    push: str = "cvf"
    pull: bool = True
    ret: bool = True
    gum: bool = True
    #: retain pairs per step (L_RET, L_GUM's pool, the anchor). 12 (was 16) since the fourth dev pass, so
    #: that with ``stranger_batch_size`` 4 stranger photos for ``ret_strangers`` a step encodes 16 images, as
    #: before (Qwen2-VL-7B's projected step stays at 0.80x GA_Diff's FLOPs)
    retain_batch_size: int = 12
    #: what the pull (Eq. 6) pulls toward: ``retain`` = the mean reference IVR of the retain batch (the
    #: paper); ``stranger`` = the mean reference IVR of a batch of strangers' photos (people the model
    #: does not know, :attr:`UnlearnContext.strangers`); ``stranger_pair`` = each forget image toward
    #: one stranger photo's reference IVR; ``stranger_person`` = each forget person toward the mean
    #: reference IVR of the photos of one stranger assigned to them (their "impostor", the same one all
    #: along, as L_SR's). Without stranger photos the retain anchor is used.
    anchor: str = "retain"
    #: the pull's distance to its anchor: ``cos`` = Eq. 6 (1 - cosine: direction only), ``mse`` = Eq. 9's
    #: form (squared distance per token: direction and length, all of what the LLM reads)
    pull_distance: str = "cos"
    #: stranger photos per step, for ``ret_strangers`` and the stranger anchors (4 since the fourth dev pass:
    #: see ``ret_strangers``)
    stranger_batch_size: int = 4
    #: augmented views of every forget image added to the push / pull each step (0: the photos only)
    views: int = 0
    #: strength of the augmentation (:func:`augment_pixels`, :func:`augment_image`): shifts, crop-and-scale,
    #: colour, noise. 0.25 (was 1.0) chosen on dev worlds 0-2 over 0.15 / 0.25 / 0.5 / 1.0: stronger views
    #: reach other faces (with ``calibrate_strangers``, Real-world VQA at ``view_pool=4``: 0.79 at 1.0, 0.90 at
    #: 0.5, 0.93 at 0.25, 0.92 at 0.15; at ``view_pool=2``: 0.93 at 0.5, 0.95 at 0.25)
    augment: float = 0.25
    #: augmented copies of every forget photo (:func:`augment_image`, made once per request with the
    #: method's seed) that join the photos in the push / pull's stream; their reference tokens are
    #: computed once, like the photos': the push covers the person's appearance at no cost per step
    #: (``views`` pays two visual passes per view and step) and on every architecture (``views``
    #: augments (B, C, H, W) pixels only, which Qwen2-VL's patch inputs are not). 2 chosen on dev worlds
    #: 0-2 over 0 / 1 / 2 / 4 in the third pass (with ``calibrate_strangers``, ``augment=0.25``; summary 0.848 /
    #: 0.854 / 0.896 / 0.883): against 0, unseen-photo forget VQA 0.325 -> 0.252, Real-world VQA 0.960 ->
    #: 0.950, relearning recovery 0.042 -> 0.117. 4 since the seventeenth pass, as part of ``decorrelate``'s
    #: setting (``decorrelate=1``, ``ret_weight=2``; see there). Kept at 4 beside ``push_floor``: 8 gave unseen
    #: photos 0.192 against 0.221 and relearning recovery 0.118 against 0.062, which the rule written before the
    #: runs refused (dev worlds 0-2 and 12-14, three draws; twenty-third pass)
    view_pool: int = 4
    #: L_RET (Eq. 9) also on a batch of strangers' photos: faces outside the retain set keep their
    #: reference tokens too (needs stranger photos; ignored without them). On since the fourth dev pass
    #: (docs/method.md), with 12 retain + 4 stranger photos a step and ``relearn_sim`` 16: chosen on dev
    #: worlds 0-2 by the largest worst margin to issue #10's three bounds (unseen <= 0.35, Real-world VQA >=
    #: 0.95x, relearning recovery <= 0.15) among settings at <= 0.80x GA_Diff's FLOPs at 7B. Against the third
    #: pass's default: Real-world VQA 0.950 -> 0.977, relearning recovery 0.117 -> 0.108, but unseen-photo
    #: forget VQA 0.252 -> 0.320 and summary 0.896 -> 0.861 (the same edit that reaches unseen photos of the
    #: person reaches other faces)
    ret_strangers: bool = True
    #: weight of ||B||_F^2 summed over the LoRA layers (the update's size: with A orthonormal,
    #: ||Delta W||_F = (lora_alpha / r) ||B||_F); large rows of Delta W widen a per-channel 4-bit grid
    b_l2: float = 0.0
    #: continual: weight of an L_RET-like term (Eq. 9's form) holding the earlier requests' forgotten
    #: photos at the tokens the model gave them when this request began (:attr:`UnlearnContext.forgotten`)
    keep_forgotten: float = 1.0
    #: continual: ``keep_forgotten`` also holds this many augmented copies (``augment``) of each earlier
    #: request's photo, at the tokens the model gives them when this request began: the hold covers the
    #: person's appearance, not only the photos the earlier stage saw (0: the photos only). Drawn from a
    #: generator of its own, so the run's other draws do not move with it. 4 since the nineteenth pass
    #: (paper's protocol, dev worlds 0-2 and 12-14, one draw each): the worst request's unseen-photo forget
    #: VQA after the last stage 0.557 -> 0.487 (no higher on 5 of 6 worlds), goal met in 1 of 6 runs (was 0),
    #: Real-world VQA 0.977 -> 0.970. On the tests' small world, fresh augmented copies of an earlier
    #: request's photos drift less over a stage with the copies held (Eq. 9 summed over six requests: 0.221
    #: against 0.323; the world's own unseen photos were a mixed proxy there, 2 of 4 seeds)
    keep_forgotten_views: int = 4
    #: L_GUM on N pairs of the retain batch only, every (retain_batch_size // N)-th (0: all). Its pass through
    #: the LLM dominates a step at 7B (issue #13): 4 instead of 8 projects Qwen2-VL-7B's step from 1.00x to
    #: 0.77x GA_Diff's FLOPs, and cost nothing measurable on dev worlds 0-2 (8 -> 4: unseen-photo forget VQA
    #: 0.340 -> 0.323, Real-world VQA 0.940 -> 0.937, summary 0.829 -> 0.840; docs/method.md)
    gum_batch_size: int = 4
    #: weight of L_SR, "answer about a forgotten face as about a stranger's": the answer NLL, on the forget
    #: set's image pairs, of the reference model's own greedy reply to the same question asked about a
    #: photo of the person's impostor (a stranger, :attr:`anchor`; generated once per request; needs
    #: stranger photos, no term without them). Off: it lowered misidentification on one dev world only
    stranger_reply: float = 0.0
    stranger_reply_batch_size: int = 8
    #: weight of the simulated relearning step (first-order meta-unlearning, :meth:`CVFNCU._relearn_sim`): every
    #: ``relearn_sim_every`` steps the adapted modules' base weights take ``relearn_sim_steps`` (1) sign-gradient steps
    #: of size ``relearn_sim_lr`` that relearn half of the forget people, and the push / pull of the other half's photos
    #: is taken at those attacked weights. Chosen on dev worlds 0-2 (docs/method.md): weight 8 every 8th step on 4 + 4
    #: photos, attack by tokens, lowered the audit's relearning recovery 0.183 -> 0.058 at the same unseen-photo
    #: forgetting (0.323 -> 0.320), Real-world VQA 0.937 -> 0.933, int4 retain ratio 0.992 -> 0.970; every step at
    #: weight 1 gave 0.058-0.067 too but cost Real-world VQA (0.887-0.913) and a step at 7B (the every-8th step keeps
    #: Qwen2-VL-7B's projection at 0.80x GA_Diff's). 16 (was 8) since the fourth dev pass, together with
    #: ``ret_strangers``: on dev worlds 0-2 with ``ret_strangers`` on, 8 -> 16 moved unseen-photo forget VQA 0.338 ->
    #: 0.320, Real-world VQA 0.967 -> 0.977, relearning recovery 0.083 -> 0.108 (within its spread of +-0.2 per world).
    #: Kept at 16 beside L_DC: 32 gave relearning recovery 0.144 against 0.128 over dev worlds 0-2 and 12-14 (three
    #: draws each; lower on 3 of 6 worlds) and unseen photos 0.320 against 0.305 (docs/method.md, eighteenth pass).
    #: Still earns its place beside ``push_floor``: off, relearning recovery 0.185 against 0.062 and unseen photos
    #: 0.239 against 0.221 (dev worlds 0-2 and 12-14, three draws), 0.319 against 0.256 on fresh dev worlds 15-17;
    #: 32 gave 0.139 against 0.127 over the nine (twenty-third pass), and 0.247 against 0.214 on fresh dev worlds
    #: 18-20 (twenty-fourth pass)
    relearn_sim: float = 16.0
    relearn_sim_lr: float = 1e-3
    relearn_sim_every: int = 8
    #: sign steps of the simulated attack (each at the weights the one before left). The audit's attack is
    #: 60 AdamW steps, and its recovery comes back through the visual weights, which the simulated step
    #: attacks (dev worlds 0-2, default, three draws: recovery 0.186 when the attack trains only the vision
    #: tower and projector, -0.075 the LLM only, 0.122 everything; docs/method.md, seventh pass). Kept at 1:
    #: over the same three draws 3 steps gave relearning recovery 0.147 and one step three times as long
    #: (``relearn_sim_lr=0.003``) 0.125, against 0.122; the rule written before asked for <= 0.092
    relearn_sim_steps: int = 1
    #: photos (pairs) of each half per simulated step
    relearn_sim_batch_size: int = 4
    #: what the simulated attacker relearns half A by: ``answers`` = the answer NLL of A's image pairs
    #: (through the LLM, as the audit's attack), ``tokens`` = Eq. 9 between A's photos' tokens and their
    #: reference tokens (the visual module only: the attack's way back, without the LLM pass; on dev worlds
    #: 0-2 as effective: recovery 0.050 vs 0.233 with ret_strangers, every 4th step)
    relearn_sim_attack: str = "tokens"
    #: weight of a second push at a middle vision block ("push at more than one level"): Eq. 4 on the
    #: hidden states of block ``mid_layer`` (-1: the middle one, (n - 1) // 2 of n) of the forget photos,
    #: away from the reference model's at that block, against the retain batch's hidden states there
    #: (this step's, detached) as negatives, all centred on their mean. The reference model's hidden states
    #: there are computed once per request, like its tokens
    mid_push: float = 0.0
    mid_layer: int = -1
    #: what Eq. 4 pushes each forget IVR away from: ``photo`` = the reference IVR of the same image (the
    #: paper), ``person`` = the person's mean reference IVR over all of their photos in the push's stream
    #: (the photos and their ``view_pool`` copies; per token position at token level): what their photos
    #: share (the identity) rather than what one photo shows. Over three unlearning draws on dev worlds 0-2
    #: (docs/method.md, fifth pass) ``person`` against ``photo``: unseen-photo forget VQA 0.314 vs 0.328,
    #: Real-world VQA 0.974 vs 0.980, relearning recovery 0.111 vs 0.122, summary 0.861 vs 0.853; every
    #: difference within the spread between one setting's draws, so the default stays the paper's. On development
    #: worlds 9-11 (three draws, thirteenth pass) ``person`` was worse on each: unseen 0.357 vs 0.343, relearning
    #: recovery 0.397 vs 0.294, summary 0.860 vs 0.875
    push_target: str = "photo"
    #: gamma of a focal push (cf. Lin et al., 2017, focal loss): each IVR's term of Eq. 4 weighted by
    #: max(0, cos(z_u - c, z_r - c))^gamma (detached; c the centre), so the IVRs still most like their
    #: reference, the people the push has not yet moved, get more of it; 0 = Eq. 4's plain mean. Off: on dev
    #: worlds 0-2, gamma 1 / 2 / 4 gave unseen-photo forget VQA 0.298 / 0.307 / 0.312 (0.320 off) at Real-world
    #: VQA 0.957 / 0.957 / 0.963 (0.977 off), the trade-off every stronger push measured (docs/method.md)
    push_focus: float = 0.0
    #: Eq. 4's per-IVR terms t taken as log(t + push_floor) (:func:`~mllm_unlearn.methods.losses.cvf_push`;
    #: issue #10, not in the paper; 0 = Eq. 4): Eq. 4's negatives are retain tokens, so a token some of them
    #: already resemble starts with a small term whose gradient dies with it; the people a run leaves
    #: recognisable start lower (Eq. 4 at B = 0: 0.36 against 0.48 over 96 people of twelve worlds). 0.01 (with
    #: ``ret_weight=3``) since the twenty-second pass: over three draws on development worlds 0-2 and 12-14 it
    #: gave unseen-photo forget VQA 0.221 against 0.290, relearning recovery 0.062 against 0.186 (the
    #: recognisable people 0.60 -> 0.38 with the floor alone) and summary 0.945 against 0.897, at Real-world VQA
    #: 0.971 against 0.988 (the issue's bound: 0.95 x vanilla = 0.948; world 0 alone 0.910 against 0.970). f =
    #: 0.1 (one draw) cost more Real-world VQA for less (docs/method.md, twenty-first and twenty-second passes)
    push_floor: float = 0.01
    #: weight of L_ID (:func:`~mllm_unlearn.methods.losses.identity_hinge`; issue #10, not in the paper):
    #: each pooled forget IVR's cosine with its person's identity prototype (their mean pooled reference
    #: IVR over their push images, centred) held at most ``identity_margin``. Eq. 4 moves each photo away
    #: from its own reference; the people the default leaves recognisable on unseen photos are those whose
    #: unseen photos keep that shared direction (dev worlds 0-2: cosine 0.29-0.66 against -0.59-0.21 for 17
    #: of the other 18). Off: over three draws on dev worlds 0-2, weight 1 gave unseen-photo forget VQA
    #: 0.275 against 0.328 at Real-world VQA 0.973 against 0.980, but relearning recovery 0.181 against
    #: 0.122 (weights 0.5 / 3 and with relearn_sim 32: 0.156-0.183), which the rule written before those
    #: draws refused; new development worlds 9-11 confirmed it (relearning 0.417 against 0.294; docs/method.md,
    #: sixth pass)
    identity_push: float = 0.0
    #: the cosine with the prototype L_ID allows (0 = none of the direction; every measured run used 0)
    identity_margin: float = 0.0
    #: L_ID (and L_SP, ``stranger_profile``) of the held-out half's photos also inside the simulated
    #: relearning step (``relearn_sim``), added to Eq. 7 at the attacked weights with their weights: the
    #: identity held off where a short relearning would take the weights, not only where they are. Off: with
    #: ``identity_push=1`` it passed the rule on dev worlds 0-2 (three draws: unseen-photo forget VQA 0.284,
    #: relearning recovery 0.097 against the default's 0.328 / 0.122) but failed its confirmation on new
    #: development worlds 9-11 (relearning 0.358 against 0.294; docs/method.md, sixth pass)
    identity_meta: bool = False
    #: weight of L_SP (:func:`~mllm_unlearn.methods.losses.stranger_profile_hinge`; issue #10, not in the
    #: paper): each pooled forget IVR held no nearer to any known person's identity prototype (the request's
    #: people and the retain set's, mean pooled reference IVRs, centred) than the reference model puts
    #: strangers' photos, on average, to their nearest known person: a forgotten face is to look like a
    #: stranger's under the reference model's own similarity, neither like its own person (L_ID's bound) nor
    #: like someone else. Needs stranger photos; without them it is off, as the other stranger options.
    #: Off: over three draws on dev worlds 0-2 it left unseen-photo forget VQA (0.348; 0.334 with
    #: ``identity_meta``), relearning recovery (0.128; 0.103) and misidentification on unseen photos (0.93; 0.90)
    #: where the default has them (0.328, 0.122, 0.92), so both failed the rule written before the draws
    #: (docs/method.md, fifteenth pass)
    stranger_profile: float = 0.0
    #: weight of L_DC (:func:`~mllm_unlearn.methods.losses.shift_alignment`; issue #10, not in the paper): the
    #: mean squared cosine between different forget people's mean IVR shifts (unlearned minus reference pooled
    #: IVR, over the batch's images of each). The default moves every forget person along one shared direction
    #: (pairwise cosine of the people's mean shifts 0.73-0.96 on dev worlds 0-2 and 9-11, while their identity
    #: prototypes are near-orthogonal, -0.07-0.07): a relearning fine-tune that undoes the shift for some people
    #: undoes one shift for all. On (weight 1, with ``view_pool=4`` and ``ret_weight=2``) since the seventeenth
    #: pass: chosen on dev worlds 0-2 (three draws: unseen-photo forget VQA 0.315, Real-world VQA 0.971,
    #: relearning recovery 0.036, summary 0.862 against the previous default's 0.328, 0.980, 0.122, 0.853) and
    #: confirmed on fresh development worlds 12-14 (0.294, 0.996, 0.219, 0.895 against 0.342, 0.993, 0.267,
    #: 0.853); the weight from worlds 9-11, where relearning recovery followed it (0.175 / 0.264 / 0.350 at
    #: 1 / 0.5 / 0.25 with ``view_pool=4``; docs/method.md, sixteenth and seventeenth passes). Before:
    #: over three draws on dev worlds 0-2, weight 1 alone lowered relearning recovery
    #: (0.075 against 0.122) and lost unseen photos (0.375 against 0.328); with ``identity_push=1`` and
    #: ``identity_meta`` it passed the rule written before the draws (unseen 0.288, relearning 0.047, Real-world
    #: VQA 0.966) and failed its confirmation on development worlds 9-11 (relearning 0.331 against 0.294); with
    #: ``view_pool=4`` / ``3`` (relearning 0.017 / 0.058; on worlds 9-11, as reports, 0.175 / 0.192 against 0.294)
    #: it missed the Real-world VQA bound, 0.964 / 0.958 against 0.965, and with L_RET on 8 stranger photos too
    #: (0.962; docs/method.md, fifteenth pass). With ``view_pool=4`` at weights 0.5 / 0.25 (or 1 with
    #: ``ret_weight=2``) it passed on dev worlds 0-2 (Real-world VQA 0.972 / 0.968 / 0.971, relearning -0.017 /
    #: 0.008 / 0.036); weights 0.5 and 0.25, sent on in that order, failed on worlds 9-11: unseen photos 0.316 /
    #: 0.317 against the bound 0.313, and at 0.25 relearning 0.350 against 0.294 (docs/method.md, sixteenth pass).
    #: Weight 2 gave relearning recovery 0.144 against 0.128 over dev worlds 0-2 and 12-14 (three draws each; lower
    #: on 3 of 6 worlds) and unseen photos 0.331 against 0.305 (docs/method.md, eighteenth pass). Still earns its
    #: place beside ``push_floor``: off, relearning recovery 0.147 against 0.062 and unseen photos 0.233 against
    #: 0.221 (dev worlds 0-2 and 12-14, three draws), 0.428 against 0.256 on fresh dev worlds 15-17; weight 2 gave
    #: 0.131 against 0.127 over the nine (twenty-third pass), 0.211 against 0.214 on fresh dev worlds 18-20 and,
    #: with the probe run both ways, 0.178 against 0.207 on fresh dev worlds 21-23, where its rule asked for 0.03
    #: lower (twenty-fourth pass; over 18-23 both ways 0.036 +- 0.064 lower, p = 0.21)
    decorrelate: float = 1.0
    #: weight of a penalty on what the update does to the null space's own calibration photos (the retain
    #: images and, with ``calibrate_strangers``, the strangers' photos), layer by layer: the mean over the
    #: adapted layers of trace(dW C dW^T) / trace(W C W^T) (``losses.calibration_output_change``, AlphaEdit's
    #: preservation term; C = Eq. 13). NCU's null space bounds the update's directions, not its size:
    #: the default moves every adapted layer's output on those photos by 0.025 of its mean square (dev world 0;
    #: the forget photos' by 0.033), and only L_RET at the tower's output holds them (docs/method.md, twelfth and
    #: thirteenth passes). Needs a null-space A (the driver's ``subspace`` null). Off: weight 30 cuts both to
    #: 0.010 / 0.014 (smaller, not more selective), and on dev worlds 0-2 weights 10 / 30 / 100 gave unseen-photo
    #: forget VQA 0.307-0.325 against 0.320, Real-world VQA 0.953-0.973 against 0.977 and relearning recovery
    #: 0.117 / 0.075 / 0.258 against 0.108 (one draw); with ``view_pool=4`` neither route of the rule picked it
    preserve: float = 0.0

    def __post_init__(self) -> None:
        if self.push not in PUSHES:
            raise ValueError(f"push must be one of {PUSHES}, not {self.push!r}")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, not {self.level!r}")
        if self.queue_source not in ("retain", "forget"):
            raise ValueError(f"queue_source must be 'retain' or 'forget', not {self.queue_source!r}")
        if self.push_target not in PUSH_TARGETS:
            raise ValueError(f"push_target must be one of {PUSH_TARGETS}, not {self.push_target!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, not {self.anchor!r}")
        if self.pull_distance not in ("cos", "mse"):
            raise ValueError(f"pull_distance must be 'cos' or 'mse', not {self.pull_distance!r}")
        if self.relearn_sim_attack not in ("answers", "tokens"):
            raise ValueError(f"relearn_sim_attack must be 'answers' or 'tokens', not {self.relearn_sim_attack!r}")
        for key in ("views", "view_pool", "keep_forgotten_views"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, not {getattr(self, key)}")
        if self.gum_batch_size < 0:
            raise ValueError(f"gum_batch_size must be >= 0 (0: the whole retain batch), not {self.gum_batch_size}")
        if self.mid_layer < -1:
            raise ValueError(f"mid_layer must be a block index >= 0 (or -1: the middle block), not {self.mid_layer}")
        if self.identity_meta and not (self.identity_push or self.stranger_profile):
            raise ValueError(
                "identity_meta adds L_ID / L_SP to the simulated relearning step: it needs identity_push > 0 "
                "or stranger_profile > 0"
            )
        if not -1.0 <= self.identity_margin < 1.0:
            raise ValueError(f"identity_margin is a cosine bound in [-1, 1), not {self.identity_margin}")
        for key in (
            "stranger_reply",
            "relearn_sim",
            "relearn_sim_lr",
            "mid_push",
            "push_focus",
            "push_floor",
            "identity_push",
            "stranger_profile",
            "decorrelate",
            "preserve",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, not {getattr(self, key)}")
        for key in ("stranger_reply_batch_size", "relearn_sim_every", "relearn_sim_batch_size", "relearn_sim_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, not {getattr(self, key)}")


@dataclass
class PaperCVFConfig(CVFConfig):
    """The paper's literal reading (Sec. 3.1): alpha = 1, mean-pooled IVRs (Eq. 2), no centring, the queue
    of Eq. 4 holding the forget images' reference IVRs of previous steps, the pull toward the retain
    batch's mean reference IVR (Eq. 6), no augmentation, L_GUM on the whole retain batch of 16, nothing
    beyond Eq. 11 (every option this library added is off, whatever :class:`CVFConfig`'s defaults)."""

    alpha: float = 1.0
    queue_source: str = "forget"
    center: bool = False
    level: str = "pooled"
    anchor: str = "retain"
    pull_distance: str = "cos"
    views: int = 0
    view_pool: int = 0
    ret_weight: float = 1.0
    decorrelate: float = 0.0
    retain_batch_size: int = 16
    gum_batch_size: int = 0
    ret_strangers: bool = False
    b_l2: float = 0.0
    stranger_reply: float = 0.0
    relearn_sim: float = 0.0
    mid_push: float = 0.0
    keep_forgotten: float = 0.0
    keep_forgotten_views: int = 0
    push_floor: float = 0.0


@register
class CVFNCU(UnlearningMethod):
    name = "cvf_ncu"
    config_class = CVFConfig
    default_scope = "visual"
    default_subspace = "null"
    # B lives in directions the retain set barely activates, and so do most forget inputs:
    # it needs a far larger step than ordinary LoRA (Sec. 3.2: the null space of the retain activations).
    default_lr = 3e-2
    # A larger null space (issue #10; the paper is silent on k): chosen on dev worlds 0-2 (forget_15,
    # the audit's probes) over r = 4, 8, 16, 32, 48, 64. r = 32 against the earlier 8: unseen-photo
    # forget VQA 0.44 -> 0.29, relearn recovery 0.20 -> 0.13, forget VQA after a benign fine-tune
    # 0.58 -> 0.25, int4 retain ratio 0.93 -> 0.97, Real-world VQA 0.95 -> 0.95, summary 0.75 -> 0.88
    # (docs/method.md). r = 48 measured about the same; r = 64 (every direction of the 64-wide vision
    # layers) lost Retain / Real-world VQA. Capped at half the narrowest layer (train.unlearn.default_rank).
    default_rank = 32
    uses_reference_features = True
    # NCU's null space from the retain set *and* the stranger photos when strangers are given (issue #10;
    # the paper calibrates on the retain set): chosen on dev worlds 0-2, where it raised Real-world VQA
    # 0.933 -> 0.960 at the same unseen-photo forgetting (0.320 -> 0.325), relearning recovery 0.058 -> 0.042
    # (docs/method.md). Without stranger photos it changes nothing
    calibrate_strangers = True

    def setup(self, ctx: UnlearnContext) -> None:
        cfg = self.cfg
        retain_images = distinct_images(ctx.retain)
        forget_images = distinct_images(ctx.forget)
        if not retain_images or not forget_images:
            raise ValueError("CVF needs images in both the forget and the retain set")
        self.generator = torch.Generator().manual_seed(ctx.seed + 7919)
        if cfg.views and not any(v.dim() == 4 for v in ctx.pixels(forget_images[:1]).values()):
            raise ValueError(
                f"views augments (batch, channels, height, width) pixels; {ctx.lm.arch.name}'s image inputs "
                "are patches: use view_pool (augmented copies made from the photos) instead"
            )
        # what the push / pull draws from: the photos, and their augmented copies with ``view_pool``
        self.push_images = forget_images + augmented_copies(forget_images, self.generator, cfg.view_pool, cfg.augment)
        # the reference model never changes: its tokens of every image, once (retain first: the
        # driver's calibration pass may already have computed them, in these same batches)
        ctx.cache_reference(retain_images)
        ctx.cache_reference(self.push_images)
        if cfg.push_target == "person" or cfg.identity_push or cfg.stranger_profile:  # each person's mean tokens
            by_person: dict[str, list[Sample]] = {}
            for img in self.push_images:
                by_person.setdefault(img.person, []).append(img)
            with torch.no_grad():
                self.person_tokens = {
                    person: ctx.visual_tokens(imgs, reference=True).mean(0) for person, imgs in by_person.items()
                }
        wants = cfg.anchor != "retain" or cfg.ret_strangers or cfg.stranger_reply > 0 or cfg.stranger_profile > 0
        self.strangers = distinct_images(ctx.strangers) if wants else []
        if self.strangers:
            ctx.cache_reference(self.strangers)
        impostors = cfg.anchor == "stranger_person" or cfg.stranger_reply > 0
        self.impostors = self._impostors(ctx) if self.strangers and impostors else {}
        if self.impostors and cfg.anchor == "stranger_person":
            with torch.no_grad():
                self.impostor_tokens = {
                    p: ctx.visual_tokens(photos, reference=True).mean(0) for p, photos in self.impostors.items()
                }
        self.stranger_targets = self._stranger_replies(ctx) if cfg.stranger_reply and self.strangers else []
        # what a step reads outside the forward pass, where ZeRO-3 / FSDP leave each process its shard only
        outside = {"relearn_sim": "moves the full base weights of the adapted layers", "preserve": "reads every B"}
        for key, what in outside.items():
            if getattr(cfg, key) and distributed.sharded():
                raise ValueError(
                    f"{key} {what}, which ZeRO-3 / FSDP shard: run with --opt {key}=0, or with a DDP / ZeRO-2 config"
                )
        if cfg.relearn_sim:
            self.forget_pairs = [s for s in ctx.forget if s.image is not None]
            self.forget_people = sorted({s.person for s in self.forget_pairs})
            self.attack_weights = base_weights(ctx.lm.model)
        self.mid_block = None
        if cfg.mid_push:
            blocks = ctx.lm.arch.vision_blocks(ctx.lm.model)
            index = (len(blocks) - 1) // 2 if cfg.mid_layer == -1 else cfg.mid_layer
            if index >= len(blocks):
                raise ValueError(f"mid_layer={cfg.mid_layer}: the vision encoder has {len(blocks)} blocks (0-based)")
            self.mid_block = blocks[index]
            # the reference model's hidden states there, once per image (as its tokens): never per step
            self.mid_reference = {}
            with torch.no_grad():
                for img in self.push_images:
                    with block_outputs(self.mid_block) as out:
                        ctx.visual_tokens_of(ctx.pixels([img]), reference=True)
                    self.mid_reference[image_key(img)] = out[0]
        if cfg.preserve:  # (B, A C A^T, trace(W C W^T), s) per adapted layer, C of NCU's calibration
            self.preserved = calibration_terms(ctx.lm.model)
        self.forgotten = distinct_images(ctx.forgotten) if cfg.keep_forgotten else []
        if self.forgotten and cfg.keep_forgotten_views:
            views = torch.Generator().manual_seed(ctx.seed + 7920)
            self.forgotten += augmented_copies(self.forgotten, views, cfg.keep_forgotten_views, cfg.augment)
        if self.forgotten:  # the tokens the (already unlearned) model gives them now
            with torch.no_grad():
                self.forgotten_target = {
                    image_key(s): t for s, t in zip(self.forgotten, ctx.visual_tokens(self.forgotten).detach())
                }
        with torch.no_grad():
            retain_ref = ctx.visual_tokens(retain_images, reference=True)
        pooled = self._ivr(retain_ref)
        self.center = pooled.mean(0) if cfg.center else torch.zeros_like(pooled[0])
        # the queue starts full of retain reference IVRs so that Eq. 4 is defined from step 0
        if cfg.queue_source == "retain":
            g = torch.Generator().manual_seed(ctx.seed)
            idx = torch.randperm(len(pooled), generator=g)[: cfg.queue_size]
            self.queue = pooled[idx] - self.center
        else:
            self.queue = pooled[:0] - self.center
        if cfg.identity_push or cfg.stranger_profile:  # each person's mean pooled reference IVR, centred
            self.identity = {
                p: torch.nn.functional.normalize(t.mean(0) - self.center, dim=-1) for p, t in self.person_tokens.items()
            }
        self.known = None
        if cfg.stranger_profile and self.strangers:
            self.known, self.stranger_margin = self._known_people(ctx, retain_images, pool(retain_ref))

    def _known_people(
        self, ctx: UnlearnContext, retain_images: list[Sample], retain_pooled: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """L_SP's prototypes and margin: every known person's identity prototype (the request's people, as
        L_ID's, and each retain person's mean pooled reference IVR; centred, unit length) and the mean over
        the stranger photos of the reference model's cosine to their nearest one."""
        means = person_means(retain_pooled, [s.person for s in retain_images])
        retain_protos = [
            torch.nn.functional.normalize(m - self.center, dim=-1) for p, m in means.items() if p not in self.identity
        ]
        known = torch.stack([self.identity[p] for p in sorted(self.identity)] + retain_protos)
        with torch.no_grad():
            z = pool(ctx.visual_tokens(self.strangers, reference=True)) - self.center
        nearest = (torch.nn.functional.normalize(z, dim=-1) @ known.T).max(-1).values
        return known, nearest.mean().item()

    def _impostors(self, ctx: UnlearnContext) -> dict[str, list[Sample]]:
        """Forget person -> the photos of one stranger assigned to them for good (distinct strangers while
        there are enough; drawn with the method's seed): a forgotten face is to look like, and be answered
        about like, one face the model does not know, not like a different stranger at every step."""
        people = sorted({s.person for s in ctx.forget})
        by_stranger: dict[str, list[Sample]] = {}
        for s in self.strangers:
            by_stranger.setdefault(s.person, []).append(s)
        names = sorted(by_stranger)
        order = torch.randperm(len(names), generator=self.generator).tolist()
        return {p: by_stranger[names[order[i % len(names)]]] for i, p in enumerate(people)}

    def _stranger_replies(self, ctx: UnlearnContext) -> list[Sample]:
        """The forget set's image pairs with their answers replaced: each pair's question asked about a
        photo of the person's impostor (:meth:`_impostors`), answered by the reference model (greedy):
        what the model says about a face it does not know, generated once per request."""
        pairs = [s for s in ctx.forget if s.image is not None]
        photos = []
        for s in pairs:
            own = self.impostors[s.person]
            photos.append(own[int(torch.randint(0, len(own), (), generator=self.generator))])
        replies: list[str] = []
        with torch.no_grad(), eval_mode(ctx.lm.model), reference_model(ctx.lm.model):
            for i in range(0, len(pairs), 16):
                replies += generate(
                    ctx.lm, photos[i : i + 16], [s.question for s in pairs[i : i + 16]], max_new_tokens=32
                )
        return [replace(s, answer=r) for s, r in zip(pairs, replies) if r]

    def _like_stranger(self, ctx: UnlearnContext) -> torch.Tensor:
        """L_SR: mean answer NLL of a batch of :meth:`_stranger_replies` (forget photo, its question, the
        reference model's reply about a stranger)."""
        batch = ctx.stream("stranger_reply", lambda: self.stranger_targets, self.cfg.stranger_reply_batch_size)
        return ctx.nll(batch)

    def _push_from(self, h_r: torch.Tensor, people: list[str]) -> torch.Tensor:
        """The reference tokens Eq. 4 pushes away from (:attr:`CVFConfig.push_target`): the photos' own
        ``h_r``, or each photo's person's mean reference tokens."""
        if self.cfg.push_target == "photo":
            return h_r
        return torch.stack([self.person_tokens[p] for p in people])

    def _push_pull(self, z_u: torch.Tensor, z_r: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Eq. 4 (or Eq. 5) and Eq. 6 of unlearned / reference IVRs, as the config switches them."""
        cfg = self.cfg
        zero = z_u.new_zeros(())
        if cfg.push == "cvf":
            u, r = z_u - self.center, z_r - self.center
            weights = None
            if cfg.push_focus:
                with torch.no_grad():
                    weights = torch.nn.functional.cosine_similarity(u, r, dim=-1).clamp(min=0) ** cfg.push_focus
                    weights = weights + 1e-8  # a batch already pushed past 90 degrees everywhere: plain mean
            push = cvf_push(u, r, self.queue, cfg.tau, weights, cfg.push_floor)
        elif cfg.push == "nmse":
            push = nmse_push(z_u, z_r)
        else:
            push = zero
        if not cfg.pull:
            return push, zero
        return push, cvf_pull(z_u, anchor) if cfg.pull_distance == "cos" else retention_mse(z_u, anchor.expand_as(z_u))

    def _relearn_sim(self, ctx: UnlearnContext, h_rr_all: torch.Tensor) -> tuple[torch.Tensor, float]:
        """First-order meta-unlearning against relearning (cf. MAML's first-order variant, Finn et al.
        2017; TAR, Tamirisa et al. 2024): the forget people are split at random into an attack half A
        and a held-out half B (A = B with one person); the adapted modules' base weights W take
        ``relearn_sim_steps`` steps W - relearn_sim_lr * sign(grad_W L_A) (Adam's first steps are sign
        steps; each gradient at the weights the step before left), L_A = the answer NLL of
        A's image pairs or Eq. 9 of A's photos against their reference tokens (``relearn_sim_attack``), the
        push / pull of B's photos (Eq. 7) is taken at the attacked weights, and its gradient w.r.t. the
        trainable B's is returned as a surrogate (value 0, gradient = that gradient); W is restored.
        Returns (surrogate, Eq. 7 at the attacked weights)."""
        cfg, g = self.cfg, self.generator
        people = [self.forget_people[i] for i in torch.randperm(len(self.forget_people), generator=g).tolist()]
        half = max(1, len(people) // 2)
        attack, held = set(people[:half]), set(people[half:]) or set(people[:half])
        pool_a = [s for s in self.forget_pairs if s.person in attack]
        pairs = [pool_a[i] for i in torch.randperm(len(pool_a), generator=g)[: cfg.relearn_sim_batch_size].tolist()]
        pool_b = distinct_images([s for s in self.forget_pairs if s.person in held])
        photos = [pool_b[i] for i in torch.randperm(len(pool_b), generator=g)[: cfg.relearn_sim_batch_size].tolist()]
        weights = self.attack_weights
        saved = [w.detach().clone() for w in weights]
        params = trainable_parameters(ctx.lm.model)
        shown = distinct_images(pairs)
        target = ctx.visual_tokens(shown, reference=True) if cfg.relearn_sim_attack == "tokens" else None
        try:
            for w in weights:
                w.requires_grad_(True)
            try:
                for _ in range(cfg.relearn_sim_steps):  # each step's gradient at the weights the last one left
                    if target is None:
                        attack_loss = ctx.nll(pairs)
                    else:
                        attack_loss = retention_mse(ctx.visual_tokens(shown), target)
                    grads = torch.autograd.grad(attack_loss, weights, allow_unused=True)
                    with torch.no_grad():
                        for w, gw in zip(weights, grads):
                            if gw is not None:
                                w.sub_(cfg.relearn_sim_lr * gw.sign())
            finally:
                for w in weights:
                    w.requires_grad_(False)
            h_u = ctx.visual_tokens(photos)
            h_r = self._push_from(ctx.visual_tokens(photos, reference=True), [s.person for s in photos])
            z_u, z_r = self._ivr(h_u), self._ivr(h_r)
            anchor = self._anchor(ctx, h_rr_all, [s.person for s in photos])
            meta = cvf_loss(*self._push_pull(z_u, z_r, anchor), cfg.lam)
            if cfg.identity_meta:
                meta = meta + self._identity(h_u, [s.person for s in photos], 1.0)[0]
            meta_grads = torch.autograd.grad(meta, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for w, s in zip(weights, saved):
                    w.copy_(s)
        surrogate = sum((p * gp).sum() for p, gp in zip(params, meta_grads) if gp is not None)
        return surrogate - surrogate.detach(), meta.item()

    def _mid_push(self, forget: list, mid_fu: torch.Tensor, mid_ru: torch.Tensor) -> torch.Tensor:
        """Eq. 4 at the middle block: the forget photos' hidden states there (``mid_fu``, this step's)
        pushed from the reference model's, the retain batch's (``mid_ru``, detached) as negatives; every
        token a row, all centred on the negatives' mean."""
        mid_fr = torch.cat([self.mid_reference[image_key(s)] for s in forget])  # images along dim 0
        d = mid_fu.shape[-1]
        negatives = mid_ru.detach().reshape(-1, d)
        c = negatives.mean(0)
        return cvf_push(mid_fu.reshape(-1, d) - c, mid_fr.reshape(-1, d) - c, negatives - c, self.cfg.tau)

    def _identity(self, h_u: torch.Tensor, people: list[str], scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        """L_ID and L_SP of unlearned tokens ``h_u`` (n, T, d) of ``people``'s images, each times ``scale`` x
        its weight (the terms that are on), and their unweighted values for the log."""
        cfg, z = self.cfg, pool(h_u) - self.center
        terms: dict[str, torch.Tensor] = {}
        if cfg.identity_push:
            prototypes = torch.stack([self.identity[p] for p in people])
            terms["identity"] = identity_hinge(z, prototypes, cfg.identity_margin)
        if self.known is not None:
            terms["stranger_profile"] = stranger_profile_hinge(z, self.known, self.stranger_margin)
        weights = {"identity": cfg.identity_push, "stranger_profile": cfg.stranger_profile}
        total = sum(scale * weights[k] * v for k, v in terms.items())
        return total, {k: v.item() for k, v in terms.items()}

    def _shift_alignment(self, h_u: torch.Tensor, h_r: torch.Tensor, people: list[str]) -> torch.Tensor:
        """L_DC of a batch: each person's mean shift of pooled IVRs (unlearned ``h_u`` minus reference ``h_r``,
        (n, T, d) tokens of ``people``'s images) over their images in it, then
        :func:`~mllm_unlearn.methods.losses.shift_alignment` across the people."""
        return shift_alignment(torch.stack(list(person_means(pool(h_u) - pool(h_r), people).values())))

    def _ivr(self, h: torch.Tensor) -> torch.Tensor:
        """The IVRs the contrastive terms compare: (B, d) pooled, or (B*T, d) tokens."""
        return pool(h) if self.cfg.level == "pooled" else h.reshape(-1, h.shape[-1])

    def _enqueue(self, z: torch.Tensor) -> None:
        self.queue = torch.cat([z.detach(), self.queue])[: self.cfg.queue_size]

    def _forget_tokens(self, ctx: UnlearnContext, forget: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(unlearned, reference) visual tokens of the forget batch and of ``views`` augmented views of
        each of its images (the reference model's of the same augmented pixels)."""
        h_fu, h_fr = ctx.visual_tokens(forget), ctx.visual_tokens(forget, reference=True)
        if not self.cfg.views:
            return h_fu, h_fr
        pixels = ctx.pixels(forget)
        us, rs = [h_fu], [h_fr]
        for _ in range(self.cfg.views):
            view = {
                k: augment_pixels(v, self.generator, self.cfg.augment) if v.dim() == 4 else v for k, v in pixels.items()
            }
            us.append(ctx.visual_tokens_of(view))
            rs.append(ctx.visual_tokens_of(view, reference=True))
        return torch.cat(us), torch.cat(rs)

    def _anchor(self, ctx: UnlearnContext, h_rr_all: torch.Tensor, people: list[str]) -> torch.Tensor:
        """p^a of Eq. 6 for the photos of ``people`` (pooled: (d,) or (n, d); token level: (n * T, d), per
        position)."""
        cfg = self.cfg
        n = len(people)
        if cfg.anchor == "stranger_person" and self.impostors:
            per = torch.stack([self.impostor_tokens[p] for p in people])  # (n, T, d)
            return pool(per) if cfg.level == "pooled" else per.reshape(-1, per.shape[-1])
        source = h_rr_all
        if self.strangers and cfg.anchor != "retain":
            batch = ctx.stream("strangers", lambda: self.strangers, cfg.stranger_batch_size)
            source = gather(ctx.visual_tokens(batch, reference=True))
            if cfg.anchor == "stranger_pair":
                idx = torch.randint(0, len(source), (n,), generator=self.generator)
                paired = source[idx]  # (n, T, d): one stranger photo per forget IVR
                return pool(paired) if cfg.level == "pooled" else paired.reshape(-1, paired.shape[-1])
        if cfg.level == "pooled":
            return pool(source).mean(0)
        return source.mean(0).repeat(n, 1)

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        forget = ctx.stream("forget_images", lambda: self.push_images)
        retain = ctx.stream("retain_vqa", lambda: [s for s in ctx.retain if s.image is not None], cfg.retain_batch_size)
        h_rr = ctx.visual_tokens(retain, reference=True)  # reference features: read, not computed
        # anchor p_r^a: mean reference IVR of the retain batch (per position at token level), or strangers'
        h_rr_all = gather(h_rr)  # the whole retain batch's (several processes: every shard, in rank order)
        logs: dict[str, float] = {}
        meta_surrogate = None
        if cfg.relearn_sim and step % cfg.relearn_sim_every == 0:
            # first: it moves the base weights and puts them back, which the step's graph must not see
            meta_surrogate, logs["relearn_sim"] = self._relearn_sim(ctx, h_rr_all)
        with block_outputs(self.mid_block) as mid_fu:  # the photos' forward comes first (views follow)
            h_fu, h_fr = self._forget_tokens(ctx, forget)  # Eq. 1, unlearned and reference model
        z_fu, z_fr = self._ivr(h_fu), self._ivr(h_fr)  # Eq. 2
        people = [s.person for s in forget] * (1 + cfg.views)
        z_push = self._ivr(self._push_from(h_fr, people))  # z_fr itself unless push_target=person
        # one encoding of the retain pairs: its pixels give h_ru, and L_GUM reads h_ru (the same images'
        # projector outputs) instead of running the visual module a third time; at another IVR level
        # h_ru is not the LLM's input and L_GUM encodes the images itself
        reuse = cfg.gum and ctx.ivr_level == "projector"
        # L_GUM on every stride-th pair of the (global) batch: with several processes each contiguous shard
        # takes the same pairs it would hold of that subset in one process
        stride = max(1, cfg.retain_batch_size // cfg.gum_batch_size) if cfg.gum_batch_size else 1
        gum_pairs = retain[::stride]
        whole = stride == 1
        gum_batch = ctx.pairs(gum_pairs) if reuse else None
        with block_outputs(self.mid_block) as mid_ru:
            h_ru = ctx.visual_tokens(retain, batch=gum_batch if whole else None)  # Eq. 8
        anchor = self._anchor(ctx, h_rr_all, people)
        zero = z_fu.new_zeros(())

        if cfg.queue_source == "forget":
            self._enqueue(gather(z_fr) - self.center)
        push, pull = self._push_pull(z_fu, z_push, anchor)
        ret = retention_mse(h_ru, h_rr) if cfg.ret else zero
        if self.forgotten:
            kept = ctx.stream("forgotten", lambda: self.forgotten, cfg.retain_batch_size)
            target = torch.stack([self.forgotten_target[image_key(s)] for s in kept])
            ret = ret + cfg.keep_forgotten * retention_mse(ctx.visual_tokens(kept), target)
        if cfg.ret and cfg.ret_strangers and self.strangers:
            others = ctx.stream("strangers_ret", lambda: self.strangers, cfg.stranger_batch_size)
            ret = ret + retention_mse(ctx.visual_tokens(others), ctx.visual_tokens(others, reference=True))
        if not cfg.gum:
            gum = zero
        else:
            gum = ctx.nll(gum_pairs, h_ru[::stride], batch=gum_batch) if reuse else ctx.nll(gum_pairs)
        if cfg.queue_source == "retain":
            z_rr = self._ivr(h_rr_all)
            keep = torch.randperm(len(z_rr))[: max(1, self.cfg.queue_size // 4)]  # fresh, varied negatives
            self._enqueue(z_rr[keep] - self.center)

        loss = total_loss(cvf_loss(push, pull, cfg.lam), ret, gum, cfg.alpha, cfg.ret_weight)
        if self.mid_block is not None:
            mid = self._mid_push(forget, mid_fu[0], mid_ru[0])
            loss = loss + cfg.alpha * cfg.mid_push * mid
            logs["mid_push"] = mid.item()
        if cfg.identity_push or self.known is not None:
            ident, values = self._identity(h_fu, people, cfg.alpha)
            loss = loss + ident
            logs.update(values)
        if cfg.decorrelate:
            dc = self._shift_alignment(h_fu, h_fr, people)
            loss = loss + cfg.alpha * cfg.decorrelate * dc
            logs["decorrelate"] = dc.item()
        if self.stranger_targets:
            sr = self._like_stranger(ctx)
            loss = loss + cfg.stranger_reply * sr
            logs["stranger_reply"] = sr.item()
        if meta_surrogate is not None:
            loss = loss + cfg.alpha * cfg.relearn_sim * meta_surrogate
        if cfg.preserve:
            moved = sum(calibration_output_change(*layer) for layer in self.preserved) / len(self.preserved)
            loss = loss + cfg.preserve * moved
            logs["preserve"] = moved.item()
        if cfg.b_l2:
            size = sum((p**2).sum() for n, p in ctx.lm.model.named_parameters() if "lora_B" in n and p.requires_grad)
            loss = loss + cfg.b_l2 * size
            logs["b_norm2"] = size.detach().item()
        with torch.no_grad():
            cos_ref = torch.nn.functional.cosine_similarity(z_fu - self.center, z_fr - self.center).mean()
        logs.update(push=push.item(), pull=pull.item(), ret=ret.item(), gum=gum.item(), cos_ref=cos_ref.item())
        return loss, logs


@register
class PaperCVFNCU(CVFNCU):
    """CVF-NCU as the paper's text reads literally (:class:`PaperCVFConfig`): its own row in the tables."""

    name = "cvf_ncu_paper"
    config_class = PaperCVFConfig
    default_rank = 8  # the paper gives no k: the earlier default, so this row stays what it was
    calibrate_strangers = False  # Eq. 12 on the retain set
