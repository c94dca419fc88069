"""The unlearning driver: adapters on the update scope, NCU calibration, the loop, the saved adapter.

One forget request (static unlearning) is :func:`unlearn`. Continual unlearning (Sec. 4.4) calls
:func:`attach_adapters` once — A is calibrated on the retain set and frozen for good — and then
:func:`unlearn_stage` once per request, B carrying over from one request to the next.

Several processes (``accelerate launch``, :mod:`mllm_unlearn.runtime.distributed`): calibration and
the frozen A are done on every process before anything is prepared (A then broadcast from the main
process), each process trains on its shard of every batch, and only the main process writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ..data.augment import augmented_copies
from ..data.sample import UNKNOWN_REPLY, BenchmarkData, DataError, Sample
from ..methods.base import UnlearnContext, UnlearningMethod, distinct_images, get_method
from ..models.loading import LoadedModel
from ..models.scoring import encode_images, encode_pairs, image_batches
from ..nullspace import (
    CovarianceCache,
    NCUConfig,
    attach_lora,
    cached_covariances,
    collect_covariances,
    fingerprint_samples,
    full_forward,
    target_linears,
    trainable_parameters,
    unused_layers,
)
from ..nullspace.cache import default_cache_dir, model_cache_id
from ..nullspace.reference import DEFAULT_MEMORY_MB, FILL_BATCH, ReferenceFeatures, capturing, keep_captured
from ..runtime import distributed
from ..runtime.batching import seed_everything
from ..runtime.outputs import atomic_dir
from .distill import DistillConfig, distill_visual
from .loop import TrainConfig, run


@dataclass
class UnlearnConfig:
    method: str = "cvf_ncu"
    scope: str | None = None  # None: the method's default (visual for cvf_ncu, llm for baselines)
    subspace: str | None = None  # None: the method's default (null for cvf_ncu, none otherwise)
    rank: int | None = None  # None: the method's default (32 for cvf_ncu, 8 otherwise)
    lora_alpha: float | None = None
    steps: int = 200
    lr: float | None = None  # None: the method's default
    batch_size: int = 8
    warmup: int = 10
    grad_clip: float = 1.0
    ivr_level: str = "projector"
    seed: int = 0
    cache_dir: str | None = None  # covariance cache (default: nullspace.cache.default_cache_dir())
    #: host memory (MiB) for the reference features of a request's images before they spill to disk
    #: (nullspace.reference.DEFAULT_MEMORY_MB: 1 GiB)
    reference_memory_mb: float = DEFAULT_MEMORY_MB
    #: NCU (Eq. 12-13) calibrated on the retain set *and* the stranger photos (``unlearn(strangers=...)``):
    #: A then spans the directions neither uses, so B cannot reach what faces outside the retain set
    #: activate either (an input-side counterpart of ``ret_strangers``). None: the method's
    #: (``UnlearningMethod.calibrate_strangers``: on for cvf_ncu, off for cvf_ncu_paper; docs/method.md)
    calibrate_strangers: bool | None = None
    #: augmented copies (:func:`~mllm_unlearn.data.augment.augmented_copies`, strength
    #: ``calibrate_augment``, drawn with ``seed``) of every calibration image join NCU's covariances, so
    #: A also avoids the directions in which other faces vary under crops, shifts, colour and noise: the
    #: input-side guard against an augmented push (CVF's ``view_pool``) reaching other faces. 0: off, since
    #: on dev worlds 0-2 two copies cost Real-world VQA (0.950 -> 0.913) at the same unseen-photo forgetting
    #: (0.252 -> 0.275; docs/method.md, "Fourth pass"). Visual null-space calibration only
    calibrate_views: int = 0
    calibrate_augment: float = 0.25
    #: request-dependent rows of A (:attr:`~mllm_unlearn.nullspace.NCUConfig.forget_directions`, not in the
    #: paper): per adapted layer, up to this many directions outside the null space where the request's
    #: forget photos carry at least ``forget_ratio`` times the calibration photos' input energy, meant to let
    #: the edit reach the input directions the relearning attack goes through. One request with a null-space
    #: A. 0: off (the paper's A), since on dev worlds 0-2 (draw 0, docs/method.md, "Tenth pass") k = 4 / 8 / 8
    #: at rho = 4 / 4 / 2 gave relearning recovery 0.183 / 0.200 / 0.108 against 0.108 and Real-world VQA
    #: 0.970 / 0.963 / 0.960 against 0.977, for unseen photos 0.315 / 0.295 / 0.283 against 0.320
    forget_directions: int = 0
    forget_ratio: float = 4.0
    #: after training, fold the adapters in and noise-and-distil the adapted visual layers (UNDO,
    #: :mod:`~mllm_unlearn.train.distill`) for this many steps; the run is then carried by its merged
    #: model, not by an adapter. Visual scopes, one request. 0: off, since on dev worlds 0-2 (three draws,
    #: docs/method.md, "Eighth pass") 3000 steps with 2000 generic faces (``unlearn(distill_images=...)``)
    #: took relearning recovery from 0.122 to 0.014 but Real-world VQA from 0.980 to 0.961, below the rule's
    #: 0.965 (and on worlds 9-11, a report, relearning only 0.294 -> 0.275); without generic images
    #: Real-world VQA fell to 0.87-0.95. ``distill_noise`` (a of the shrink-and-perturb): 0.6, the
    #: screens' best relearning at a Real-world VQA that generic faces can hold (0.3 gave back the
    #: relearning gain, 1.0 cost Real-world VQA 0.87); ``distill_lr`` 3e-3 (1e-3 at twice the steps:
    #: Real-world VQA 0.953 against 0.933, relearning 0.067 against 0.017); ``distill_views``: augmented
    #: copies per distillation image (2; 8: 0.927 and 0.058). With 8000 generic faces (tenth pass) Real-world VQA
    #: held (0.971) but unseen photos came back (0.328 -> 0.362) and the summary fell (0.853 -> 0.821). See
    #: :class:`DistillConfig`
    distill_steps: int = 0
    distill_noise: float = 0.6
    distill_lr: float = 3e-3
    distill_views: int = 2
    #: continual unlearning without replay: before each request after the first, fold the adapters in and
    #: calibrate a new null space on the retain set *and the earlier requests' photos* as the model now
    #: encodes them, so the new request's edit cannot reach what the earlier edits made of them (Sec. 3.2's
    #: lifelong-editing argument, AlphaEdit's null space of the previous edits; the paper's Sec. 3.2 itself
    #: keeps one A for all requests). Each stage then saves its own adapter (its own A) and the run its
    #: merged model. Off, since on dev worlds 0-2 (docs/method.md, "Twelfth pass") the worst request on unseen
    #: photos after five went only 0.607 -> 0.573 (the rule asked 0.557), and without ``keep_forgotten`` the
    #: earlier requests came back (0.820): each stage still moved the earlier requests' layer outputs by 0.78
    #: times as much as its own request's (1.21 with one A)
    recalibrate: bool = False

    def __post_init__(self) -> None:
        if self.calibrate_views < 0:
            raise ValueError(f"calibrate_views must be >= 0, got {self.calibrate_views}")
        if not 0 <= self.calibrate_augment <= 2:
            raise ValueError(f"calibrate_augment must be in [0, 2], got {self.calibrate_augment}")
        NCUConfig(forget_directions=self.forget_directions, forget_ratio=self.forget_ratio)  # refuses bad forget_*
        self.distill_config()  # refuses bad distill_* values

    def distill_config(self) -> DistillConfig:
        """The noise-and-distil stage's settings (``distill_steps`` = 0: none)."""
        return DistillConfig(
            steps=self.distill_steps,
            noise=self.distill_noise,
            lr=self.distill_lr,
            views=self.distill_views,
            seed=self.seed,
        )


def split_people(data: BenchmarkData, forget_people: Iterable[str] | None = None) -> tuple[list[Sample], list[Sample]]:
    """Training pairs of the forget people (default: the benchmark's forget split, which the reader
    already checked is disjoint from its retain split) and of the other retain people; both non-empty."""
    forget_ids = frozenset(forget_people) if forget_people is not None else data.forget_people
    retain_ids = data.retain_people - forget_ids
    forget = [s for s in data.train if s.person in forget_ids]
    retain = [s for s in data.train if s.person in retain_ids]
    if not forget:
        raise DataError(f"{data.name}: no training pairs for the forget people {sorted(forget_ids)[:10]}")
    if not retain:
        raise DataError(f"{data.name}: no training pairs for the retain people")
    return forget, retain


def stranger_samples(data: BenchmarkData, exclude: Iterable[str] = ()) -> list[Sample]:
    """Training photos of people the model was taught not to know: pairs whose answer is the world's
    "I don't know" reply (:data:`~mllm_unlearn.data.sample.UNKNOWN_REPLY`, the synthetic world's taught
    strangers in ``Pretrain_Data``), one per distinct image, people in ``exclude`` left out. Empty for a
    benchmark without such pairs (MLLMU-Bench itself): the stranger anchor then falls back to the
    retain anchor (see :class:`~mllm_unlearn.methods.cvf_ncu.CVFConfig`)."""
    skip = frozenset(exclude)
    return distinct_images(
        [s for s in data.train if s.image is not None and s.person not in skip and s.answer.strip() == UNKNOWN_REPLY]
    )


class _CalibrationInputs:
    """Model inputs of the retain set, encoded lazily batch by batch (nothing is encoded when every
    layer is cached): its images for a visual scope, its training pairs for the LLM."""

    def __init__(self, lm: LoadedModel, items: Sequence[Sample], visual: bool) -> None:
        self.lm, self.items = lm, items
        self.size, self.encode = (FILL_BATCH, encode_images) if visual else (16, encode_pairs)
        self.current: Sequence[Sample] = ()  # the samples of the batch last yielded

    def __len__(self) -> int:
        return -(-len(self.items) // self.size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(0, len(self.items), self.size):
            self.current = self.items[i : i + self.size]
            yield self.encode(self.lm, self.current).inputs


def resolve_calibrate_strangers(cfg: UnlearnConfig, method: type[UnlearningMethod]) -> bool:
    """Whether NCU calibrates on the stranger photos too: ``cfg``'s choice, else the method's."""
    return method.calibrate_strangers if cfg.calibrate_strangers is None else cfg.calibrate_strangers


def default_rank(method: type[UnlearningMethod], widths: Sequence[int]) -> int:
    """The LoRA rank when none is given: the method's ``default_rank``, at most half the narrowest
    adapted layer's input width. The cap keeps a null space a null space: r of the d directions with
    the least retain energy, never all of them (at r = d, NCU's A spans everything and protects
    nothing: on the dev worlds 0-2, r = 64 on the demo model's 64-wide vision layers dropped Real-world
    VQA to 0.26-0.77, see docs/method.md). The tests' and ``--quick``'s 32-wide towers get r = 16."""
    return max(1, min(method.default_rank, min(widths, default=2 * method.default_rank) // 2))


def attach_adapters(
    lm: LoadedModel,
    retain: Sequence[Sample],
    cfg: UnlearnConfig,
    method: type[UnlearningMethod],
    strangers: Sequence[Sample] = (),
    forget: Sequence[Sample] = (),
    *,
    cache: bool = True,
) -> LoadedModel:
    """Wrap the model with LoRA on the update scope; for NCU, A = null-space basis of the retain set.

    Calibration (Eq. 12-13) runs once over the retain set: its images for a visual scope (only the
    vision tower and projector run), its training pairs for the LLM; over ``strangers`` too where
    :func:`resolve_calibrate_strangers` says so. Covariances are cached on disk, keyed by model + data +
    layer, so the next run with the same model and data reuses them: in ``cfg.cache_dir``, by default in
    the user cache (:func:`~mllm_unlearn.nullspace.default_cache_dir`), never in the model's folder; a
    model with no name or path is not cached unless ``cache_dir`` is set.

    Several processes: every process calibrates on the same retain data (no process holds data the
    others lack, and nothing of size d x d per layer is sent); with a cache the main process goes
    first and the others read its entries. A is then broadcast from the main process: the null-space
    basis is an eigenbasis of near-zero, near-degenerate eigenvalues, which last-bit differences
    between devices could rotate, and a frozen A is no DDP parameter that DDP would keep in sync.
    All of this happens before ``accelerator.prepare`` (in the training loop), as ZeRO-3 / FSDP need.

    The visual calibration pass runs the reference model (no LoRA yet) over every distinct retain
    image: for a method that reads reference features (``uses_reference_features``) at
    ``ivr_level="projector"`` its outputs are kept on the returned model as the next request's
    :class:`~mllm_unlearn.nullspace.reference.ReferenceFeatures` (taken by
    :meth:`~mllm_unlearn.methods.base.UnlearnContext.cache_reference`). With every layer's
    covariance cached that pass does not run, and the request computes them in its own pass, in the
    same batches (the same bits). Every process calibrates, so every process holds the same store.

    ``forget``: the request's training pairs, needed by ``cfg.forget_directions`` only; their covariances
    are collected in a second, uncached pass (they are the request's, not the model's).
    ``cache=False``: no covariance cache, for a model that exists only in memory (a continual stage's
    merged model, :attr:`UnlearnConfig.recalibrate`), whose cache id would still be its folder's.
    """
    distributed.place(lm.model)
    scope = cfg.scope or method.default_scope
    subspace = cfg.subspace or method.default_subspace
    pattern = lm.arch.scope_pattern(scope)
    linears = target_linears(lm.model, pattern)
    names = list(linears)
    visual = scope in ("visual", "projector")
    images = distinct_images(retain)
    exclude = []
    if visual:
        if not images:
            raise DataError("the retain set has no images to calibrate the visual module on")
        exclude = unused_layers(lm.model, names, image_batches(lm, images[:8])[0])
        names = [n for n in names if n not in exclude]
    if cfg.calibrate_views and not (visual and subspace == "null"):
        raise ValueError(
            f"calibrate_views augments the images of a visual null-space calibration; scope {scope!r} with "
            f"subspace {subspace!r} has none"
        )
    rank = cfg.rank or default_rank(method, [linears[n].in_features for n in names])
    ncu = NCUConfig(
        rank=rank,
        alpha=cfg.lora_alpha,
        subspace=subspace,
        seed=cfg.seed,
        forget_directions=cfg.forget_directions,
        forget_ratio=cfg.forget_ratio,
    )  # refuses bad settings before the calibration passes
    request = (distinct_images(forget) if visual else list(forget)) if cfg.forget_directions else []
    if cfg.forget_directions and not request:
        raise DataError("forget_directions needs the forget request's " + ("images" if visual else "pairs"))
    covariances = captured = forget_covariances = None
    if subspace == "null":
        items = list(images if visual else retain)
        if resolve_calibrate_strangers(cfg, method):  # distinct photos with their "I don't know" pairs
            items += distinct_images(strangers) if visual else list(strangers)
        if cfg.calibrate_views:
            g = torch.Generator().manual_seed(cfg.seed + 104729)
            items += augmented_copies(items, g, cfg.calibrate_views, cfg.calibrate_augment)
        inputs = _CalibrationInputs(lm, items, visual)
        plain = (lambda m, x: lm.arch.image_features(m, x)) if visual else full_forward
        forward = plain
        if visual and method.uses_reference_features and cfg.ivr_level == "projector":
            captured = ReferenceFeatures(cfg.ivr_level, memory_mb=cfg.reference_memory_mb)
            forward = capturing(captured, forward, lambda: inputs.current)
        model_id = model_cache_id(lm.model)
        cache_root = (cfg.cache_dir or (default_cache_dir() if model_id else None)) if cache else None
        if cache_root is not None:
            with distributed.main_first():
                covariances = cached_covariances(
                    lm.model,
                    names,
                    inputs,
                    cache=CovarianceCache(cache_root),
                    model_id=model_id,
                    data_fingerprint=fingerprint_samples(items),
                    forward=forward,
                )
        else:
            covariances = collect_covariances(lm.model, names, inputs, forward=forward)
        if cfg.forget_directions:
            request_inputs = _CalibrationInputs(lm, request, visual)
            forget_covariances = collect_covariances(lm.model, names, request_inputs, forward=plain)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    model = attach_lora(lm.model, pattern, ncu, covariances, exclude=exclude, forget_covariances=forget_covariances)
    distributed.broadcast_(p for n, p in model.named_parameters() if "lora_A" in n)
    if captured is not None:
        keep_captured(model, captured)
    return LoadedModel(model, lm.processor, lm.arch, adapters={"rank": rank, "lora_rank": ncu.lora_rank})


def unlearn_stage(
    lm: LoadedModel,
    method: UnlearningMethod,
    forget: Sequence[Sample],
    retain: Sequence[Sample],
    cfg: UnlearnConfig,
    *,
    log_file: Path | None = None,
    desc: str | None = None,
    strangers: Sequence[Sample] = (),
    forgotten: Sequence[Sample] = (),
) -> list[dict]:
    """Train the adapters of ``lm`` (already attached) to forget ``forget``; returns the log rows.
    ``strangers``: photos of people the model does not know (:attr:`UnlearnContext.strangers`);
    ``forgotten``: photos of people earlier requests forgot (:attr:`UnlearnContext.forgotten`)."""
    seed_everything(cfg.seed)
    ctx = UnlearnContext(
        lm,
        list(forget),
        list(retain),
        cfg.batch_size,
        cfg.seed,
        cfg.ivr_level,
        cfg.reference_memory_mb,
        strangers=list(strangers),
        forgotten=list(forgotten),
    )
    lm.model.train()
    method.setup(ctx)
    if not method.trains:  # e.g. MANU: one weight edit, no optimiser loop
        history = [{"step": 0, **method.apply(ctx)}]
        if log_file is not None:
            with open(log_file, "a") as fh:
                fh.write(json.dumps(history[0]) + "\n")
        lm.model.eval()
        return history
    train_cfg = TrainConfig(
        steps=cfg.steps,
        lr=cfg.lr or method.default_lr,
        batch_size=cfg.batch_size,
        warmup=cfg.warmup,
        grad_clip=cfg.grad_clip,
        seed=cfg.seed,
        log_every=10,
    )
    history = run(
        trainable_parameters(lm.model),
        lambda step: method.loss(ctx, step),
        train_cfg,
        desc=desc or f"unlearn[{method.name}]",
        log_file=log_file,
        model=lm.model,
    )
    lm.model.eval()
    return history


def save_run(lm: LoadedModel, out_dir: str | Path, record: dict, *, merge: bool = False) -> Path:
    """Write the PEFT adapter (``adapter/``), ``run.json`` and optionally a merged model, atomically.

    Runs that edit base weights are only carried by the merged model: callers pass ``merge=True`` for
    methods that train no adapters (MANU's pruning), and a model without adapters (a distilled run,
    :attr:`UnlearnConfig.distill_steps`) is written as ``merged/`` only, whatever ``merge`` says.

    Several processes: only the main process writes, the others wait for it (and fail with it);
    every process ends with the same ``lm`` (merged on each when ``merge``)."""
    out = Path(out_dir)
    adapters = isinstance(lm.model, PeftModel)
    state = distributed.full_state_dict(lm.model) if adapters else None  # None unless sharded (ZeRO-3, FSDP)
    if merge and state is not None:
        raise ValueError(
            "--merge is not supported with sharded parameters (ZeRO-3 / FSDP): merge the "
            "saved adapter afterwards, or use a DDP / ZeRO-2 config"
        )

    def write() -> None:
        with atomic_dir(out) as tmp:
            if adapters:
                lm.model.save_pretrained(tmp / "adapter", state_dict=state)
            (tmp / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
            if merge or not adapters:
                merged(lm).save_pretrained(tmp / "merged")

    distributed.on_main(write)
    if merge and not distributed.is_main():
        merged(lm)
    return out


def unlearn(
    lm: LoadedModel,
    data: BenchmarkData,
    cfg: UnlearnConfig,
    method_cfg: Any = None,
    *,
    forget_people: Iterable[str] | None = None,
    strangers: Sequence[Sample] | None = None,
    distill_images: Sequence[Sample] = (),
) -> tuple[LoadedModel, list[dict]]:
    """Static unlearning of one forget request; returns the adapted model and the training log.
    ``strangers``: photos of people the model does not know; default :func:`stranger_samples` of ``data``.
    ``distill_images``: more images for the noise-and-distil stage (``cfg.distill_steps``), e.g. a generic
    face corpus, on top of the request's forget, retain and stranger photos."""
    if cfg.recalibrate:
        raise ValueError("recalibrate calibrates a null space per request of a continual run (--tasks)")
    method_cls = get_method(cfg.method)
    forget, retain = split_people(data, forget_people)
    if strangers is None:
        strangers = stranger_samples(data, {s.person for s in forget})
    method = method_cls(method_cfg)
    scope = cfg.scope or method_cls.default_scope
    if cfg.distill_steps:  # refused before any training
        if scope not in ("visual", "projector"):
            raise ValueError(f"distill_steps distils the visual module; scope {scope!r} trains none of it")
        if distributed.world_size() > 1:
            raise ValueError("distill_steps runs in one process: launch without accelerate / torchrun")
    lm = attach_adapters(lm, retain, cfg, method_cls, strangers, forget)
    history = unlearn_stage(lm, method, forget, retain, cfg, strangers=strangers)
    if cfg.distill_steps:
        merged(lm)  # the student starts from the unlearned weights (adapters folded in), learns their tokens back
        images = distinct_images(forget) + distinct_images(retain) + distinct_images(strangers) + list(distill_images)
        log = distill_visual(lm, images, lm.arch.scope_pattern(scope), cfg.distill_config())
        history += [{"distill_step": r["step"], "distill_loss": r["distill_loss"]} for r in log]
    return lm, history


def merged(lm: LoadedModel) -> LoadedModel:
    """``lm`` with its adapters folded into the weights, in eval mode (as it is when it carries none:
    a distilled run, :attr:`UnlearnConfig.distill_steps`)."""
    if isinstance(lm.model, PeftModel):
        lm.model = lm.model.merge_and_unload()
    lm.model.eval()
    return lm


def run_record(
    cfg: UnlearnConfig, method: UnlearningMethod, history: list[dict], lm: LoadedModel, **extra: Any
) -> dict:
    """What ``run.json`` holds: the driver and method configs, resolved defaults, the log. ``lm``: the
    unlearned model, whose :attr:`~LoadedModel.adapters` give the rank used (the method's default capped
    by :func:`default_rank`, and the LoRA rank with ``forget_directions``)."""
    return {
        "unlearn": asdict(cfg),
        "method_config": method.config_dict(),
        "resolved": {
            "scope": cfg.scope or method.default_scope,
            "subspace": cfg.subspace or method.default_subspace,
            "lr": cfg.lr or method.default_lr,
            **(lm.adapters or {}),
            "calibrate_strangers": resolve_calibrate_strangers(cfg, type(method)),
        },
        "log": history,
        **extra,
    }
