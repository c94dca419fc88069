"""Cost of one unlearning step of each method at real size, projected on the meta device.

A published model (:mod:`mllm_unlearn.models.published`, e.g. LLaVA-1.5-7B, Qwen2-VL-7B) is built on
the meta device in bf16 — its real modules, no memory — and gets LoRA on the method's default update
scope (:func:`mllm_unlearn.nullspace.attach_lora`; under NCU A is any frozen matrix, here PEFT's
initial one with ``requires_grad=False``). One step of the method is then run, forward and backward,
under ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention: elementwise
work is not counted), with ``torch.autograd.graph.saved_tensors_hooks`` adding up the tensors the
step keeps for backward.

The methods' own loss code needs a tokenizer, a processor and real numbers (``.item()``, boolean
indexing), none of which exist on meta tensors. So each step is written here as its STRUCTURE:
which passes it makes (:class:`Pass`: how many samples, how many with an image, with gradient or as
the reference model with adapters disabled and no gradient, full model or the visual module only)
at the library's default batch sizes, read off ``mllm_unlearn.methods`` (see :data:`STEPS`). A pass
runs the real modules: the vision tower and projector on the images, the LLM on the padded batch
(a batch that mixes pairs with and without the image is padded to the longest row, as the library's
encoders do), ``lm_head`` at the answer positions only (as ``ArchAdapter.answer_logits``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..methods import get_method
from ..models.base import get_arch
from ..models.published import build_on_meta, published_config
from ..nullspace import NCUConfig, attach_lora, base_weights, target_linears
from ..runtime.options import parse_options


@dataclass
class Shapes:
    """Sequence and batch shapes of the projection (MLLMU-Bench-like QA pairs).

    ``text_tokens``: prompt template + question + answer + EOS of one pair; ``answer_tokens``: the
    answer + EOS (where the loss is); ``image_size``: pixels of the square image (None: the vision
    config's size for LLaVA, 448 for Qwen2-VL, i.e. 1024 patches -> 256 LLM tokens); ``vqa_fraction``:
    share of a person's training pairs asked with the image (MLLMU-Bench and the demo world: half).
    Batches: the library's defaults (``UnlearnConfig.batch_size`` 8; CVF's from its config,
    :class:`~mllm_unlearn.methods.cvf_ncu.CVFConfig`, with ``cvf_options`` applied).
    """

    text_tokens: int = 60
    answer_tokens: int = 30
    image_size: int | None = None
    vqa_fraction: float = 0.5
    batch_size: int = 8
    #: what-ifs: ``--opt``-style options of CVF-NCU's config (e.g. ``retain_batch_size=8``)
    cvf_options: tuple[str, ...] = ()
    rank: int | None = None  # None: the method's default_rank (32 for cvf_ncu, 8 for the baselines)
    queue_size: int = 256


@dataclass(frozen=True)
class Pass:
    """One pass of a step. ``rows`` samples, ``images`` of them with the image; ``grad``: in the loss's
    graph (else the reference model: adapters disabled, no gradient); ``visual``: image features only
    (no LLM); ``kl``: its logits enter a KL term (both distributions kept); ``reuse``: an LLM pass fed
    with the image features of the step's last grad visual pass (no second vision pass); ``base_grad``:
    the visual module's base weights get gradients too (CVF's simulated relearning attack); ``phase``:
    a step's passes of one phase form one graph with its own backward, the phases one after another (CVF's
    simulated relearning runs and frees its graphs before the step's own), so activations peak at the
    largest phase's."""

    rows: int
    images: int
    grad: bool = True
    visual: bool = False
    kl: bool = False
    reuse: bool = False
    base_grad: bool = False
    phase: int = 0


def _mixed(n: int, shapes: Shapes) -> int:
    return round(n * shapes.vqa_fraction)


def cvf_steps(method: str, shapes: Shapes = Shapes()) -> list[list[Pass]]:
    """CVF-NCU's steps (``cvf_ncu`` or ``cvf_ncu_paper``) at its config's defaults: Eq. 11 = the adapted
    IVRs of the forget images and of the retain batch, and L_GUM = retain answer NLL through the frozen
    LLM fed with those retain IVRs; with ``ret_strangers`` the adapted IVRs of a stranger batch (Eq. 9),
    with ``stranger_reply`` L_SR's forget image pairs through the model;
    with ``relearn_sim`` every ``relearn_sim_every``-th step adds the simulated attack on half A (its
    photos through the visual module, or its image pairs through the model, with gradients on the
    visual base weights) and the held-out half's photos at the attacked weights; ``views`` adds each view
    of the forget batch through the adapted and the reference visual module. The reference IVRs of the
    photos (and ``view_pool``'s copies, and ``mid_push``'s hidden states) are computed once per request
    (``nullspace.reference.ReferenceFeatures``), not per step: not counted."""
    cfg = parse_options(get_method(method).config_class, shapes.cvf_options)
    b, rb = shapes.batch_size, cfg.retain_batch_size
    gum = cfg.gum_batch_size or rb
    views = [Pass(b, b, visual=True, grad=g) for _ in range(cfg.views) for g in (True, False)]
    # the order of the loss: forget photos, their views, the retain batch (L_GUM reuses its features)
    main = [Pass(b, b, visual=True), *views, Pass(rb, rb, visual=True), Pass(gum, gum, reuse=True)]
    if cfg.ret_strangers:
        main.append(Pass(cfg.stranger_batch_size, cfg.stranger_batch_size, visual=True))
    if cfg.stranger_reply:  # L_SR: forget image pairs through the model (stranger photos supplied)
        main.append(Pass(cfg.stranger_reply_batch_size, cfg.stranger_reply_batch_size))
    if not cfg.relearn_sim:
        return [main]
    n = cfg.relearn_sim_batch_size
    attack = Pass(n, n, visual=cfg.relearn_sim_attack == "tokens", base_grad=True, phase=-1)
    return [[attack, Pass(n, n, visual=True, phase=-1), *main]] + [main] * (cfg.relearn_sim_every - 1)


def method_steps(method: str, shapes: Shapes = Shapes()) -> list[list[Pass]]:
    """The passes of one step of ``method`` at its defaults (a list per kind of step, each counted once
    per period: MMUnlearner alternates two, CVF-NCU's simulated relearning comes every k-th step).
    Mirrors ``mllm_unlearn.methods`` (forget_modality ``all`` mixes pairs with and without the image;
    MMUnlearner's forget set is ``vqa``)."""
    if method in ("cvf_ncu", "cvf_ncu_paper"):
        return cvf_steps(method, shapes)
    b = shapes.batch_size
    mix = Pass(b, _mixed(b, shapes))
    ref_mix = Pass(b, _mixed(b, shapes), grad=False)
    steps = {
        "ga": [[mix]],  # -NLL(forget)
        "ga_diff": [[mix, mix]],  # -NLL(forget) + NLL(retain)
        "simnpo": [[mix, mix]],  # SimNPO(forget) + NLL(retain), reference-free
        "npo": [[mix, ref_mix, mix]],  # NPO(forget vs reference on the same batch) + NLL(retain)
        # -NLL(forget) + NLL(retain) + KL(ref || theta) on the retain batch
        "kl_min": [[mix, Pass(b, _mixed(b, shapes), kl=True), Pass(b, _mixed(b, shapes), grad=False, kl=True)]],
        # even steps -NLL(forget VQA), odd steps NLL(preserve: retain pairs + forget text-only pairs)
        "mmunlearner": [[Pass(b, b)], [mix]],
        # CE + KL(ref || theta) on one batch of (a) relabelled forget VQA, (b) forget QA, (c) retain pairs
        "siu": [[Pass(3 * b, b + _mixed(b, shapes), kl=True), Pass(3 * b, b + _mixed(b, shapes), grad=False, kl=True)]],
    }
    if method not in steps:
        raise ValueError(f"no step structure for method {method!r}; known: {sorted(steps)}")
    return steps[method]


def _parts(arch_name: str) -> dict[str, str]:
    """Module-path regexes of the model's parts (for the per-part breakdown)."""
    if arch_name == "llava":
        return {
            "vision": r".*vision_tower.*",
            "projector": r".*multi_modal_projector.*",
            "llm": r".*language_model.*",
            "lm_head": r".*lm_head.*",
        }
    return {
        "vision": r".*visual\.(?:blocks|patch_embed).*",
        "projector": r".*visual\.merger.*",
        "llm": r".*language_model.*",
        "lm_head": r".*lm_head.*",
    }


def _unused_vision_layers(model: torch.nn.Module, config, names: Sequence[str]) -> list[str]:
    """LLaVA reads CLIP layer ``vision_feature_layer`` (-2): the layers after it get no gradient
    (the library leaves them out of the LoRA, ``nullspace.unused_layers``)."""
    layer = getattr(config, "vision_feature_layer", None)
    if not isinstance(layer, int) or layer >= 0:
        return []
    depth = config.vision_config.num_hidden_layers
    unused = set(range(depth + layer + 1, depth))
    return [
        n
        for n in names
        if (m := re.search(r"vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.", n))
        and int(m.group(1)) in unused
    ]


class _FlashLikeAttention(torch.autograd.Function):
    """Attention with the work and the saved tensors of a fused (flash) kernel, for meta tensors.

    On the meta device ``scaled_dot_product_attention`` takes the math path: it upcasts to float32
    and keeps the (heads x length x length) probabilities for backward, which a GPU's fused kernel
    never stores. This keeps q, k, v, the output and the float32 log-sum-exp per row, and in
    backward recomputes the scores (5 matmuls, as flash attention's backward). Key/value heads
    shared by several query heads (GQA) are expanded inside, not stored expanded.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        groups = q.shape[-3] // k.shape[-3]
        kk, vv = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
        p = (q @ kk.transpose(-2, -1) * scale).softmax(-1)
        out = p @ vv
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.groups = scale, groups
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, _ = ctx.saved_tensors
        kk, vv = k.repeat_interleave(ctx.groups, -3), v.repeat_interleave(ctx.groups, -3)
        p = (q @ kk.transpose(-2, -1) * ctx.scale).softmax(-1)
        dv = p.transpose(-2, -1) @ dout
        dp = dout @ vv.transpose(-2, -1)
        ds = p * (dp - (dout * out).sum(-1, keepdim=True)) * ctx.scale
        dq, dk = ds @ kk, ds.transpose(-2, -1) @ q
        if ctx.groups > 1:
            dk = dk.unflatten(-3, (-1, ctx.groups)).sum(-3)
            dv = dv.unflatten(-3, (-1, ctx.groups)).sum(-3)
        return dq, dk, dv, None, None


def flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Drop-in for ``F.scaled_dot_product_attention`` during a projection. Masks (``attn_mask``,
    ``is_causal``) are ignored: they change no FLOPs, so the values are right only without a mask."""
    return _FlashLikeAttention.apply(query, key, value, is_causal, scale or query.shape[-1] ** -0.5)


@contextmanager
def fused_attention():
    """Within: ``torch.nn.functional.scaled_dot_product_attention`` is :func:`flash_like_sdpa`."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_like_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _next_sequence_nr() -> int:
    """The autograd sequence number the next graph node gets (nodes are numbered in creation order)."""
    with torch.enable_grad():
        return torch.zeros((), requires_grad=True).mul(1).grad_fn._sequence_nr()


class PartFlopCounter:
    """FLOPs per part of the model, forward AND backward, next to ``FlopCounterMode``'s total.

    ``FlopCounterMode``'s own per-module counts are unreliable in backward here: its module tracker
    closes a module when the gradient reaches the module's inputs, which never happens for a frozen
    tower fed with pixels, so later backward work is counted toward it too. Instead each part's
    forward runs under a label (module hooks) and records the range of autograd node numbers it
    created; before backward every node of the loss's graph gets a pre-hook that sets the label of
    the part that created it. Each counted op adds its FLOPs to the current label.
    """

    def __init__(self, parts: dict[str, torch.nn.Module]) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        counter = self

        class Mode(FlopCounterMode):
            def _count_flops(self, func_packet, out, args, kwargs):
                if func_packet in self.flop_registry:
                    counter.flops[counter.label] += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                return super()._count_flops(func_packet, out, args, kwargs)

        self.mode = Mode(display=False)
        self.flops = dict.fromkeys([*parts, "other"], 0.0)
        self.label, self.stack, self.ranges = "other", [], []
        self.handles = []
        for name, module in parts.items():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._enter(name)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self._exit()))

    def _enter(self, name: str) -> None:
        self.stack.append((name, _next_sequence_nr(), self.label))
        self.label = name

    def _exit(self) -> None:
        name, start, previous = self.stack.pop()
        self.ranges.append((start, _next_sequence_nr(), name))
        self.label = previous

    def _part_of(self, seq: int) -> str:
        inside = [(end - start, name) for start, end, name in self.ranges if start <= seq < end]
        return min(inside)[1] if inside else "other"

    def tag_graph(self, loss: torch.Tensor) -> None:
        """Before ``loss.backward()``: label every node of its graph with the part that created it."""
        seen, todo = set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            part = self._part_of(node._sequence_nr())
            node.register_prehook(lambda grads, part=part: setattr(self, "label", part))
            todo.extend(n for n, _ in node.next_functions)
        self.label = "other"

    def __enter__(self) -> PartFlopCounter:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def total(self) -> float:
        return float(self.mode.get_total_flops())


@dataclass
class StepCost:
    method: str
    scope: str
    flops: float
    flops_by_part: dict[str, float]
    hand_flops: float
    weights_bytes: int
    lora_bytes: int  # trainable LoRA with gradient and AdamW state, plus frozen A
    activation_bytes: int
    extra_bytes: int  # method state: MMUnlearner's masks, CVF's queue
    reference_copies: int = 0
    trainable_params: int = 0
    passes: list[list[Pass]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.lora_bytes + self.activation_bytes + self.extra_bytes

    @property
    def dominant(self) -> str:
        part, flops = max(self.flops_by_part.items(), key=lambda kv: kv[1])
        return f"{part} {flops / self.flops:.0%}"


class MetaModel:
    """A published model on meta with LoRA on one update scope; runs passes of synthetic inputs."""

    def __init__(self, name: str, scope: str, frozen_a: bool, shapes: Shapes, rank: int = 8) -> None:
        self.config = published_config(name)
        self.arch = get_arch(self.config.model_type)
        self.shapes = shapes
        model = build_on_meta(self.config)
        names = list(target_linears(model, self.arch.scope_pattern(scope)))
        exclude = _unused_vision_layers(model, self.config, names) if scope != "llm" else []
        self.model = attach_lora(
            model, self.arch.scope_pattern(scope), NCUConfig(rank=rank, subspace="none"), exclude=exclude
        )
        if frozen_a:  # NCU: A frozen, only B trains
            for n, p in self.model.named_parameters():
                if "lora_A" in n:
                    p.requires_grad_(False)
        self.base = self.model.get_base_model()
        self.d = self.config.text_config.hidden_size
        if self.arch.name == "llava":
            vc = self.config.vision_config
            self.image_size = shapes.image_size or vc.image_size
            self.patches = (self.image_size // vc.patch_size) ** 2
            self.image_tokens = self.patches  # strategy "default" drops CLS
        else:
            vc = self.config.vision_config
            self.image_size = shapes.image_size or 448
            side = self.image_size // vc.patch_size
            self.patches = side * side
            self.image_tokens = self.patches // vc.spatial_merge_size**2

    def image_features(self, n: int) -> torch.Tensor:
        dtype = torch.bfloat16
        if self.arch.name == "llava":
            px = torch.empty(n, 3, self.image_size, self.image_size, device="meta", dtype=dtype)
            return torch.stack(list(self.base.model.get_image_features(pixel_values=px).pooler_output))
        from transformers.vision_utils import get_vision_position_ids

        vc = self.config.vision_config
        side = self.image_size // vc.patch_size
        grid = torch.tensor([[1, side, side]] * n)
        px = torch.empty(
            n * self.patches, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, device="meta", dtype=dtype
        )
        pos = get_vision_position_ids(grid, vc.spatial_merge_size).to("meta")
        out = self.base.model.visual(px, grid_thw=grid, position_ids=pos).pooler_output
        return out.reshape(n, self.image_tokens, -1)

    def seq_len(self, p: Pass) -> int:
        return self.shapes.text_tokens + (self.image_tokens if p.images else 0)  # padded to the longest row

    def answer_logits(self, p: Pass, features: torch.Tensor | None = None) -> torch.Tensor:
        length, a = self.seq_len(p), self.shapes.answer_tokens
        ids = torch.empty(p.rows, length, dtype=torch.long, device="meta")
        emb = self.base.get_input_embeddings()(ids)
        if p.images:
            feats = self.image_features(p.images) if features is None else features[: p.images]
            with_image = torch.cat([feats, emb[: p.images, self.image_tokens :]], 1)
            emb = torch.cat([with_image, emb[p.images :]], 0)
        kw = {}
        if self.arch.name != "llava":  # M-RoPE: (3, batch, length) positions
            kw["position_ids"] = torch.empty(3, p.rows, length, dtype=torch.long, device="meta")
        hidden = self.base.model.language_model(inputs_embeds=emb, **kw).last_hidden_state
        return self.base.lm_head(hidden[:, length - a - 1 : length - 1].reshape(-1, hidden.shape[-1]))

    def run(self, p: Pass, features: torch.Tensor | None = None) -> torch.Tensor:
        if p.base_grad:
            weights = base_weights(self.model)
            for w in weights:
                w.requires_grad_(True)
            try:
                return self.run(replace(p, base_grad=False), features)
            finally:
                for w in weights:
                    w.requires_grad_(False)
        if p.grad:
            return self.image_features(p.images) if p.visual else self.answer_logits(p, features)
        with torch.no_grad(), self.model.disable_adapter():
            return self.image_features(p.images) if p.visual else self.answer_logits(p, features)

    def step_loss(self, passes: Sequence[Pass]) -> torch.Tensor:
        """Run the passes and combine them into one scalar as the methods do (CE on answer logits,
        KL between a grad and a reference pass, squared distances between visual tokens)."""
        outs, last_visual = [], None
        for p in passes:
            out = self.run(p, last_visual if p.reuse else None)
            if p.visual and p.grad:
                last_visual = out
            outs.append((p, out))
        loss = torch.zeros((), device="meta")
        kl_ref = next((o for p, o in outs if p.kl and not p.grad), None)
        visual_ref = [o for p, o in outs if p.visual and not p.grad]
        for p, o in outs:
            if not p.grad:
                continue
            if p.visual:  # push/pull/RET: compare with the reference tokens (same images)
                ref = next((r for r in visual_ref if r.shape == o.shape), o.detach())
                loss = loss + ((o - ref) ** 2).sum(-1).mean()
            else:
                targets = torch.empty(o.shape[0], dtype=torch.long, device="meta")
                loss = loss + F.cross_entropy(o.float(), targets)
                if p.kl and kl_ref is not None:
                    log_p, log_q = F.log_softmax(kl_ref.float(), -1), F.log_softmax(o.float(), -1)
                    loss = loss + (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        return loss

    def part_modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose work the per-part breakdown reports (the projector of Qwen2-VL sits inside
        its vision tower: innermost wins)."""
        if self.arch.name == "llava":
            vision, projector = self.base.model.vision_tower, self.base.model.multi_modal_projector
        else:
            vision, projector = self.base.model.visual, self.base.model.visual.merger
        return {
            "vision": vision,
            "projector": projector,
            "llm": self.base.model.language_model,
            "lm_head": self.base.lm_head,
        }

    # -- the hand count ------------------------------------------------------------------------
    def _linear_params(self, pattern: str) -> int:
        return sum(
            m.weight.numel()
            for n, m in self.base.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in n and re.fullmatch(pattern, n)
        )

    def hand_flops(self, passes: Sequence[Pass], visual_grad: bool) -> float:
        """2 x params x tokens per matmul pass: forward of every pass; backward of the grad passes
        (input gradients only — base weights are frozen — so 1x the forward; LoRA, attention scores
        and elementwise work left out). The vision tower is in the backward only when it carries LoRA."""
        parts = _parts(self.arch.name)
        p_llm, p_vis, p_proj = (self._linear_params(parts[k]) for k in ("llm", "vision", "projector"))
        p_head = self.base.lm_head.weight.numel()
        total = 0.0
        for p in passes:
            vis = 0.0 if p.reuse else 2 * p.images * (p_vis * self._vision_tokens() + p_proj * self.image_tokens)
            text = (
                0.0
                if p.visual
                else 2 * (p_llm * p.rows * self.seq_len(p) + p_head * p.rows * self.shapes.answer_tokens)
            )
            total += vis + text
            if p.grad:
                total += text + (vis if visual_grad else 0.0)
            if p.base_grad:  # the weight gradients of the visual module
                total += vis
        return total

    def _vision_tokens(self) -> int:
        return self.patches + 1 if self.arch.name == "llava" else self.patches  # CLIP adds a CLS token


def project(name: str, method: str, shapes: Shapes = Shapes()) -> StepCost:
    """FLOPs and memory of one step of ``method`` (its default scope) on the published model ``name``."""
    cls = get_method(method)
    if not cls.trains:
        raise ValueError(f"method {method!r} does not train (no step to count)")
    scope = cls.default_scope
    rank = shapes.rank or cls.default_rank
    mm = MetaModel(name, scope, frozen_a=cls.default_subspace != "none", shapes=shapes, rank=rank)
    steps = method_steps(method, shapes)
    param_storages = {p.untyped_storage()._cdata for p in mm.model.parameters()}
    flops, by_part, acts, hand = [], [], [], []
    visual_grad = scope != "llm"
    counted: dict[tuple[Pass, ...], tuple] = {}
    for passes in steps:
        if tuple(passes) in counted:  # a step kind repeated within the period: counted once, weighed as many
            for out, value in zip((flops, by_part, acts, hand), counted[tuple(passes)]):
                out.append(value)
            continue
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            s = t.untyped_storage()
            if s._cdata not in param_storages:
                saved.setdefault(s._cdata, s.nbytes())
            return t

        peak = 0
        with fused_attention(), PartFlopCounter(mm.part_modules()) as counter:
            for phase in sorted({p.phase for p in passes}):
                saved.clear()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = mm.step_loss([p for p in passes if p.phase == phase])
                counter.tag_graph(loss)
                loss.backward()
                # the attack's weight gradients and the copy of W it restores from live through its phase
                attack = any(p.base_grad for p in passes if p.phase == phase)
                weight_bytes = sum(w.numel() * w.element_size() for w in base_weights(mm.model)) if attack else 0
                peak = max(peak, sum(saved.values()) + 2 * weight_bytes)
        mm.model.zero_grad(set_to_none=True)
        flops.append(counter.total())
        by_part.append(counter.flops)
        acts.append(peak)
        hand.append(mm.hand_flops(passes, visual_grad))
        counted[tuple(passes)] = (flops[-1], by_part[-1], acts[-1], hand[-1])
    n = len(steps)
    trainable = [p for p in mm.model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    frozen_a = sum(p.numel() for name_, p in mm.model.named_parameters() if "lora_A" in name_ and not p.requires_grad)
    lora_bytes = 16 * n_train + 4 * frozen_a  # fp32 LoRA: weight, grad, AdamW m and v; frozen A: weight only
    weights = sum(p.numel() * p.element_size() for n_, p in mm.model.named_parameters() if "lora_" not in n_)
    extra = 4 * n_train if method == "mmunlearner" else 0  # saliency masks in the parameters' dtype
    if method in ("cvf_ncu", "cvf_ncu_paper"):
        extra = 4 * (shapes.queue_size + 1) * mm.d  # negative queue + centre, float32
    return StepCost(
        method=method,
        scope=scope,
        flops=sum(flops) / n,
        flops_by_part={k: sum(s[k] for s in by_part) / n for k in by_part[0]},
        hand_flops=sum(hand) / n,
        weights_bytes=weights,
        lora_bytes=lora_bytes,
        activation_bytes=max(acts),
        extra_bytes=extra,
        trainable_params=n_train,
        passes=steps,
    )


def trained_methods() -> list[str]:
    from ..methods import available_methods

    return [m for m in available_methods() if get_method(m).trains]


def format_table(name: str, costs: Sequence[StepCost], baseline: str = "ga_diff") -> str:
    base = next((c for c in costs if c.method == baseline), None)
    gib = 2**30
    head = (
        f"{'method':<12} {'scope':<7} {'TFLOP/step':>10} {'x ' + baseline:>10} {'hand/count':>10} "
        f"{'weights GiB':>11} {'LoRA+opt GiB':>12} {'act GiB':>8} {'extra GiB':>9} {'ref copies':>10} "
        f"{'total GiB':>9} {'x ' + baseline:>10}  dominant part of the FLOPs"
    )
    lines = [f"{name} (bf16; meta-device projection)", head, "-" * len(head)]
    for c in costs:
        r_f = f"{c.flops / base.flops:.2f}" if base else "-"
        r_m = f"{c.total_bytes / base.total_bytes:.2f}" if base else "-"
        lines.append(
            f"{c.method:<12} {c.scope:<7} {c.flops / 1e12:>10.1f} {r_f:>10} {c.hand_flops / c.flops:>10.2f} "
            f"{c.weights_bytes / gib:>11.2f} {c.lora_bytes / gib:>12.2f} {c.activation_bytes / gib:>8.1f} "
            f"{c.extra_bytes / gib:>9.2f} {c.reference_copies:>10} {c.total_bytes / gib:>9.1f} "
            f"{r_m:>10}  {c.dominant}"
        )
    return "\n".join(lines)
