"""Unlearning methods: each is a small class that only defines its loss, picked by name from a registry.

A method sees an :class:`UnlearnContext`: the model (with adapters attached), the forget and retain
training pairs, endless batch streams over them, and helpers for the quantities losses are made of
(answer NLL, visual tokens of the adapted or the reference model; the reference model's are read from
a :class:`~mllm_unlearn.nullspace.reference.ReferenceFeatures` store filled once per request, see
:meth:`UnlearnContext.cache_reference`). Everything else — adapters,
calibration, the optimiser loop, saving — is the driver's (:mod:`mllm_unlearn.train.unlearn`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, ClassVar

import torch

from ..data.sample import Sample
from ..models.base import Batch
from ..models.loading import LoadedModel
from ..models.scoring import answer_nll, concat_images, encode_images, encode_pairs, eval_mode, single_image_inputs
from ..nullspace import reference_model
from ..nullspace.reference import DEFAULT_MEMORY_MB, ReferenceFeatures, image_key, take_captured
from ..runtime.batching import batches
from ..runtime.distributed import shard

_METHODS: dict[str, type[UnlearningMethod]] = {}


def register(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_METHODS)


def report_order() -> list[str]:
    """Every registered method in the order the README's tables list them (``--methods all``): the
    baselines alphabetically, then the paper's literal reading, then cvf_ncu, so the method a table is
    about sits last, under the row it departs from."""
    ours = [m for m in ("cvf_ncu_paper", "cvf_ncu") if m in _METHODS]
    return [m for m in available_methods() if m not in ours] + ours


def get_method(name: str) -> type[UnlearningMethod]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _METHODS[name]


@dataclass
class UnlearnContext:
    """What a method's loss may use. ``lm.model`` is the adapter-wrapped model.

    ``reference``: the reference features of the request's images (None until :meth:`cache_reference`
    creates it); ``reference_memory_mb``: the host memory it keeps before spilling to disk.
    ``strangers``: photos of people the model does not know (never to be forgotten or kept; e.g. the
    world's strangers taught "I don't know", or a user's photos of non-famous people): what "unknown"
    looks like, for methods that pull toward it (empty when none were supplied)."""

    lm: LoadedModel
    forget: list[Sample]
    retain: list[Sample]
    batch_size: int
    seed: int
    ivr_level: str = "projector"
    reference_memory_mb: float = DEFAULT_MEMORY_MB
    reference: ReferenceFeatures | None = None
    strangers: list[Sample] = field(default_factory=list)
    #: photos of people forgotten by earlier requests (continual unlearning without replay)
    forgotten: list[Sample] = field(default_factory=list)
    _streams: dict[str, Iterator[list[Sample]]] = field(default_factory=dict, repr=False)
    _pixel_cache: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _pixel_bytes: int = field(default=0, repr=False)

    def stream(self, name: str, items: Callable[[], Sequence[Sample]], batch_size: int | None = None) -> list[Sample]:
        """The next batch of a named endless stream (created on first use, seeded by name and seed;
        ``zlib.crc32``, not the per-process salted ``hash``, so the same seed gives the same batches).
        With several processes each gets its shard of that same batch (``runtime.distributed.shard``)."""
        if name not in self._streams:
            pool = list(items())
            if not pool:
                raise ValueError(f"stream {name!r} has no samples")
            self._streams[name] = batches(
                pool, min(batch_size or self.batch_size, len(pool)), zlib.crc32(name.encode()) % 10_000 + self.seed
            )
        return shard(next(self._streams[name]))

    # -- common quantities ---------------------------------------------------------------------
    def nll(
        self, samples: Sequence[Sample], image_features: torch.Tensor | None = None, *, batch: Batch | None = None
    ) -> torch.Tensor:
        """Mean answer-token NLL (over the GLOBAL batch's tokens with several processes):
        :func:`~mllm_unlearn.models.scoring.answer_nll`. ``batch``: ``samples`` already encoded
        (:meth:`pairs`); ``image_features``: their projector outputs (images, tokens, d) when already
        computed (e.g. :meth:`visual_tokens` of the same samples at ``ivr_level="projector"``): the
        visual module is then not run again. Per-sample sums:
        :func:`~mllm_unlearn.models.scoring.answer_logprobs`."""
        return answer_nll(self.lm, samples, image_features, batch)

    def pairs(self, samples: Sequence[Sample]) -> Batch:
        """``samples`` as question + answer model inputs (:func:`~mllm_unlearn.models.scoring.encode_pairs`);
        their pixels are those :meth:`visual_tokens` needs, so one encoding can serve both."""
        return encode_pairs(self.lm, samples)

    def visual_tokens(
        self, samples: Sequence[Sample], *, reference: bool = False, batch: Batch | None = None
    ) -> torch.Tensor:
        """Token-level IVRs H (images, tokens, d) at ``ivr_level`` (Eq. 1 / Eq. 8); ``reference=True``
        gives the reference model's (adapters disabled, no gradient): read from :attr:`reference` when
        a method created it (images it lacks are added first), else computed. ``batch``: ``samples``
        already encoded (any prompt: only the pixels are used), instead of encoding their images."""
        if reference:
            if self.reference is not None:
                self.reference.fill(samples, self._reference_tokens)
                return self.reference.get(samples, self.lm.model.device)
            return self._reference_tokens(samples)
        lm = self.lm
        inputs = self._pixels(samples) if batch is None else batch.inputs
        return lm.arch.visual_tokens(lm.model, inputs, self.ivr_level)

    def visual_tokens_of(self, inputs: dict[str, torch.Tensor], *, reference: bool = False) -> torch.Tensor:
        """Visual tokens at ``ivr_level`` of already-encoded image ``inputs`` (e.g. augmented pixels):
        the adapted model's, or with ``reference=True`` the reference model's (no gradient, eval mode,
        never stored: these pixels are not an image of the request)."""
        lm = self.lm
        if not reference:
            return lm.arch.visual_tokens(lm.model, inputs, self.ivr_level)
        with torch.no_grad(), eval_mode(lm.model), reference_model(lm.model):
            return lm.arch.visual_tokens(lm.model, inputs, self.ivr_level)

    def pixels(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The encoded image inputs of ``samples`` (cached per image; see :meth:`_pixels`)."""
        return self._pixels(samples)

    def _pixels(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The image inputs of ``samples`` (``arch.pixel_keys``), each image encoded once per request and
        kept (up to ``reference_memory_mb``; the image processor treats images one by one, so the
        concatenation equals a batch encoding): an image seen every epoch is not decoded and
        processed again at every step."""
        keys = [image_key(s) for s in samples]
        todo = {k: s for k, s in zip(keys, samples) if k not in self._pixel_cache}
        if todo and self._pixel_bytes > self.reference_memory_mb * 2**20:
            return encode_images(self.lm, samples).inputs
        for k, one in zip(todo, single_image_inputs(self.lm, list(todo.values()))):
            self._pixel_cache[k] = one
            self._pixel_bytes += sum(t.numel() * t.element_size() for t in one.values())
        return concat_images([self._pixel_cache[k] for k in keys])

    def _reference_tokens(self, samples: Sequence[Sample]) -> torch.Tensor:
        """The reference model's visual tokens of ``samples``, in one no-grad pass in eval mode (as
        calibration runs it; the same as train mode for vision towers without dropout)."""
        lm = self.lm
        batch = encode_images(lm, samples)
        with torch.no_grad(), eval_mode(lm.model), reference_model(lm.model):
            return lm.arch.visual_tokens(lm.model, batch.inputs, self.ivr_level)

    def cache_reference(self, samples: Sequence[Sample]) -> ReferenceFeatures:
        """Make :attr:`reference` hold the reference features of every image of ``samples``: created on
        first use — from what the driver captured during NCU calibration when it left a store on the
        model (the retain images' projector outputs), else empty — then the missing images computed in
        batches of distinct images. Every process computes the same (it sees every sample)."""
        if self.reference is None:
            captured = take_captured(self.lm.model, self.ivr_level)
            self.reference = (
                captured
                if captured is not None
                else ReferenceFeatures(self.ivr_level, memory_mb=self.reference_memory_mb)
            )
        self.reference.fill(samples, self._reference_tokens)
        return self.reference


def distinct_images(samples: Sequence[Sample]) -> list[Sample]:
    """One sample per distinct image (training pairs repeat each photo once per question)."""
    seen: dict[bytes, Sample] = {}
    for s in samples:
        if s.image is not None and s.image.data not in seen:
            seen[s.image.data] = s
    return list(seen.values())


class UnlearningMethod:
    """Base class: set ``name`` and ``config_class``, implement :meth:`loss`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    #: update scope and LoRA subspace the method uses unless told otherwise
    default_scope: ClassVar[str] = "llm"
    default_subspace: ClassVar[str] = "none"
    #: learning rate the method's public configs use
    default_lr: ClassVar[float] = 1e-4
    #: LoRA rank r (for a null subspace also the number of null directions, Eq. 15)
    default_rank: ClassVar[int] = 8
    #: True for methods that read the reference model's visual tokens (:meth:`UnlearnContext.visual_tokens`
    #: with ``reference=True``): the driver then keeps what NCU calibration computes of them
    uses_reference_features: ClassVar[bool] = False
    #: False for methods that edit the model once in :meth:`apply` instead of training (e.g. pruning)
    trains: ClassVar[bool] = True
    #: NCU's null space (a ``null`` subspace) from the retain set and the stranger photos, unless the
    #: driver's ``UnlearnConfig.calibrate_strangers`` says otherwise
    calibrate_strangers: ClassVar[bool] = False

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg if cfg is not None else self.config_class()

    def config_dict(self) -> dict[str, Any]:
        """Every field of the config this method runs with (defaults resolved): what keys a stored
        result, so a changed default is a changed setting."""
        return asdict(self.cfg) if is_dataclass(self.cfg) else {}

    def setup(self, ctx: UnlearnContext) -> None:
        """Called once per forget request before training (e.g. to fill a queue)."""

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def apply(self, ctx: UnlearnContext) -> dict[str, float]:
        """For ``trains = False`` methods: edit the model once (called after :meth:`setup`, instead of
        the training loop); returns what to log."""
        raise NotImplementedError(f"method {self.name!r} trains; it has no apply()")
