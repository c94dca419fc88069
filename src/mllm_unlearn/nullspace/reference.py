"""Reference features: the reference model's token-level IVRs of every image of a request, computed once.

The reference model (adapters disabled, :func:`~mllm_unlearn.nullspace.reference_model`) never changes
while B trains, so its visual tokens of an image are the same at every step. CVF needs them for the
forget images (z_f^r, Eq. 2) and the retain images (the pull anchor, Eq. 6; L_RET, Eq. 9; the queue
and the centre): :class:`ReferenceFeatures` holds them, keyed by the sha256 of the image's bytes,
filled once per request in one no-grad pass in batches, instead of running the visual module with
adapters disabled twice per step.

Where they live: in host memory up to ``memory_mb`` (:data:`DEFAULT_MEMORY_MB`); beyond that, what is in
memory is written as one safetensors chunk file to a private temporary folder (removed with the
store) and read back memory-mapped, one image at a time, when a batch needs it. Values are stored
exactly (same dtype, same bits) either way.

NCU's calibration of the visual scope runs the model before LoRA is attached — the reference model —
over every retain image: the driver captures the projector outputs of that same pass (:func:`capturing`,
:func:`keep_captured`, :func:`take_captured`), so the retain images' reference features cost no extra pass.

Same results as computing them per step? The values are those of the same model on the same image;
only the batch an image is computed in differs (here: chunks of :data:`FILL_BATCH` distinct images,
in eval mode, as calibration runs; before: each step's forget / retain batch). Batched kernels may
round differently for another batch size; on the CPU demo model they do not (features from batches of
1, 8, 16 and 32 images are bit-identical, and so are captured and separately computed stores: the same
B after 200 steps). Eval mode only matters for a vision tower with dropout, which LLaVA-1.5's CLIP
and Qwen's vision blocks have off.
"""

from __future__ import annotations

import hashlib
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.sample import Sample

#: host memory (MiB) the features are kept in before they go to chunk files on disk. 1 GiB holds the
#: reference tokens of ~3,600 images of a 7B LLaVA-1.5 (576 x 4096 bf16 = 4.5 MiB each); the demo's
#: (16 x 128 float32 = 8 KiB each) never leave memory.
DEFAULT_MEMORY_MB = 1024.0
#: distinct images per batch of the filling pass (the calibration's batch size, so that features
#: captured from calibration and features computed here are the same bits)
FILL_BATCH = 32
#: attribute of the PeftModel holding the store captured during calibration, until a request takes it
CAPTURED_ATTR = "ncu_captured_reference_features"


def image_key(sample: Sample) -> str:
    """The store's key of a sample's image: the sha256 of its bytes."""
    if sample.image is None:
        raise ValueError(f"sample {sample.id} has no image")
    return hashlib.sha256(sample.image.data).hexdigest()


class ReferenceFeatures:
    """Token-level reference IVRs (tokens, d) per distinct image at one IVR ``level``.

    ``memory_mb``: host memory kept before spilling to safetensors chunk files in ``spill_dir`` (a
    private temporary folder inside it, removed when the store is; default: the system's temp folder).
    """

    def __init__(
        self, level: str = "projector", *, memory_mb: float = DEFAULT_MEMORY_MB, spill_dir: str | Path | None = None
    ) -> None:
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0, not {memory_mb}")
        self.level = level
        self.memory_limit = int(memory_mb * 2**20)
        self.spill_dir = spill_dir
        self._memory: dict[str, torch.Tensor] = {}
        self._memory_bytes = 0
        self._on_disk: dict[str, int] = {}  # key -> chunk index
        self._chunks: list[object] = []  # open safe_open handles (memory-mapped)
        self._folder: tempfile.TemporaryDirectory | None = None

    # -- content -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._memory) + len(self._on_disk)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._on_disk

    @property
    def chunk_files(self) -> int:
        """How many chunk files were written to disk."""
        return len(self._chunks)

    def missing(self, samples: Sequence[Sample]) -> list[Sample]:
        """One sample per distinct image of ``samples`` not in the store yet, in order."""
        seen: set[str] = set()
        out = []
        for s in samples:
            if s.image is None:
                continue
            key = image_key(s)
            if key not in self and key not in seen:
                seen.add(key)
                out.append(s)
        return out

    def put(self, samples: Sequence[Sample], features: torch.Tensor) -> None:
        """Store ``features[i]`` (tokens, d) as the reference features of ``samples[i]``'s image."""
        if len(samples) != len(features):
            raise ValueError(f"{len(samples)} samples but {len(features)} feature rows")
        for s, f in zip(samples, features):
            key = image_key(s)
            if key in self:
                continue
            f = f.detach().to("cpu", copy=True).contiguous()
            self._memory[key] = f
            self._memory_bytes += f.numel() * f.element_size()
        if self._memory_bytes > self.memory_limit:
            self._spill()

    def _spill(self) -> None:
        """Write everything held in memory as one chunk file and read it back memory-mapped."""
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="reference-features-", dir=self.spill_dir)
            weakref.finalize(self, self._folder.cleanup)
        path = Path(self._folder.name) / f"chunk-{len(self._chunks):05d}.safetensors"
        save_file(self._memory, str(path), metadata={"level": self.level})
        index = len(self._chunks)
        self._chunks.append(safe_open(str(path), framework="pt"))
        self._on_disk.update(dict.fromkeys(self._memory, index))
        self._memory, self._memory_bytes = {}, 0

    def tensor(self, key: str) -> torch.Tensor:
        """The features of one image (CPU)."""
        if key in self._memory:
            return self._memory[key]
        if key in self._on_disk:
            return self._chunks[self._on_disk[key]].get_tensor(key)
        raise KeyError(f"no reference features for image {key[:12]}")

    def get(self, samples: Sequence[Sample], device: torch.device | str | None = None) -> torch.Tensor:
        """(samples, tokens, d): the stored features of each sample's image, stacked, on ``device``."""
        out = torch.stack([self.tensor(image_key(s)) for s in samples])
        return out if device is None else out.to(device)

    def fill(
        self,
        samples: Sequence[Sample],
        compute: Callable[[Sequence[Sample]], torch.Tensor],
        batch_size: int = FILL_BATCH,
    ) -> int:
        """Compute the features of every image of ``samples`` not stored yet with ``compute`` (a batch of
        distinct-image samples -> (batch, tokens, d)), ``batch_size`` images at a time; returns how many."""
        todo = self.missing(samples)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            self.put(chunk, compute(chunk))
        return len(todo)

    def close(self) -> None:
        """Forget everything and remove the chunk files."""
        self._memory, self._memory_bytes, self._on_disk, self._chunks = {}, 0, {}, []
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def capturing(
    store: ReferenceFeatures,
    forward: Callable[[torch.nn.Module, dict], torch.Tensor],
    current: Callable[[], Sequence[Sample]],
) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """A calibration forward that also stores its outputs as reference features: ``forward(model,
    inputs)`` must return the per-image features of the batch whose samples ``current()`` names (e.g.
    the adapter's ``image_features`` on a batch of distinct retain images, before LoRA is attached)."""

    def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        out = forward(model, inputs)
        store.put(current(), out)
        return out

    return run


def keep_captured(model: torch.nn.Module, store: ReferenceFeatures) -> None:
    """Leave ``store`` on ``model`` for the next request (:func:`take_captured`); empty stores are dropped."""
    if len(store):
        setattr(model, CAPTURED_ATTR, store)


def take_captured(model: torch.nn.Module, level: str) -> ReferenceFeatures | None:
    """The store captured during calibration, removed from ``model`` (one request takes it); None if there
    is none or it holds another IVR level."""
    store = model.__dict__.pop(CAPTURED_ATTR, None)
    return store if store is not None and store.level == level else None
