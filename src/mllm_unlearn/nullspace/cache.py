"""On-disk cache of retain covariances (Eq. 13), so NCU's offline calibration pass (Sec. 3.3) runs once.

One safetensors file per (model, retain data, layer), named by a sha256 key. The default folder is a
user cache (:func:`default_cache_dir`), never the model's own folder; a local model is identified by
its absolute path and its weight files' sizes and times (:func:`model_cache_id`), so a model
rewritten at the same path gets fresh entries. Covariances are stored,
not bases, so any rank r (Eq. 15) can be derived later without recalibrating. Files are written to a
temporary name and ``os.replace``d, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.sample import Sample
from .calibrate import ForwardFn, Inputs, LayerStats, collect_covariances, full_forward

#: environment variable naming the covariance cache folder (overrides the XDG default)
CACHE_ENV = "MLLM_UNLEARN_CACHE"


def default_cache_dir() -> Path:
    """``$MLLM_UNLEARN_CACHE`` if set, else ``$XDG_CACHE_HOME/mllm-unlearn/ncu``, else
    ``~/.cache/mllm-unlearn/ncu``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "mllm-unlearn" / "ncu"


def model_cache_id(model: torch.nn.Module) -> str:
    """The model's identity in cache keys: a hub id as it is (with the commit when known), a local
    folder as its absolute path plus the name, size and modification time of its config and weight
    files (a relative path or a model re-written in place then never hits another model's entries)."""
    config = getattr(model, "config", None)
    name = str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
    folder = Path(name).expanduser()
    if name and folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin") and p.is_file())
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return f"{folder.resolve()}@{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]}"
    commit = getattr(config, "_commit_hash", None)
    return f"{name}@{commit}" if commit else name


def cache_key(model_id: str, data_fingerprint: str, layer: str) -> str:
    """sha256 hex digest identifying one layer's covariance for a model and a retain set."""
    return hashlib.sha256(json.dumps([model_id, data_fingerprint, layer]).encode()).hexdigest()


def fingerprint_samples(samples: Iterable[Sample]) -> str:
    """sha256 over the samples' ids, questions, answers and image bytes, in order.

    Different retain data gives a different fingerprint. It covers the samples only: fold anything
    else that changes the activations (e.g. the prompt format) into ``model_id``.
    """
    digest = hashlib.sha256()
    for s in samples:
        image = s.image.data if s.image is not None else b""
        for field in (s.id.encode(), s.question.encode(), s.answer.encode(), image):
            digest.update(len(field).to_bytes(8, "little"))
            digest.update(field)
    return digest.hexdigest()


class CovarianceCache:
    """Covariances of layer inputs stored as ``<root>/<cache_key>.safetensors``.

    Each file holds the float64 tensor ``cov``; its metadata holds ``n_tokens``, ``layer``,
    ``model_id`` and ``data_fingerprint``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, model_id: str, data_fingerprint: str, layer: str) -> Path:
        return self.root / f"{cache_key(model_id, data_fingerprint, layer)}.safetensors"

    def get(self, model_id: str, data_fingerprint: str, layer: str) -> LayerStats | None:
        """The cached statistics, or None on a miss."""
        path = self.path(model_id, data_fingerprint, layer)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            return LayerStats(cov=f.get_tensor("cov"), n_tokens=int(f.metadata()["n_tokens"]))

    def put(self, model_id: str, data_fingerprint: str, layer: str, stats: LayerStats) -> Path:
        """Store ``stats`` atomically; returns the file's path."""
        path = self.path(model_id, data_fingerprint, layer)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            save_file(
                {"cov": stats.cov.detach().to("cpu", torch.float64).contiguous()},
                tmp,
                metadata={
                    "n_tokens": str(stats.n_tokens),
                    "layer": layer,
                    "model_id": model_id,
                    "data_fingerprint": data_fingerprint,
                },
            )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def cached_covariances(
    model: torch.nn.Module,
    names: Sequence[str],
    inputs: Iterable[Inputs],
    *,
    cache: CovarianceCache,
    model_id: str,
    data_fingerprint: str,
    forward: ForwardFn = full_forward,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """:func:`collect_covariances` through ``cache``: layers found there are read back; the rest are
    collected in one pass (``inputs`` is not iterated at all when every layer is cached) and stored."""
    stats: dict[str, LayerStats] = {}
    missing: list[str] = []
    for name in names:
        hit = cache.get(model_id, data_fingerprint, name)
        if hit is None:
            missing.append(name)
        else:
            stats[name] = hit
    if missing:
        fresh = collect_covariances(model, missing, inputs, forward=forward, progress=progress)
        for name, s in fresh.items():
            cache.put(model_id, data_fingerprint, name, s)
        stats.update(fresh)
    return {name: stats[name] for name in names}
