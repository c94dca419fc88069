"""Probe 6 (its model) — the retrained oracle: the vanilla fine-tune without the forget people.

Protocol: the base model (before the memorisation fine-tune) is fine-tuned with the vanilla model's
settings on every training pair except the forget people's — the gold standard of unlearning
(TOFU's retain-only model). It is cached in ``cache_dir/oracle-<key>``, where the key hashes the
training pairs it sees (their text and image bytes), the base model (its file names and sizes, its
config and the first MiB of each weight file) and the fine-tune settings; a second audit with the
same key reuses it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ...data.sample import BenchmarkData, Sample
from ...models.loading import load_model
from ...train.finetune import finetune
from ...train.loop import TrainConfig


def oracle_train(data: BenchmarkData) -> list[Sample]:
    """Every training pair of ``data`` except the forget people's."""
    return [s for s in data.train if s.person not in data.forget_people]


def _fingerprint_samples(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.person, s.modality, s.question, s.answer]).encode())
        h.update(hashlib.sha256(s.image.data).digest() if s.image is not None else b"-")
    return h.hexdigest()


def _fingerprint_model(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = str(f.relative_to(path))
        if rel.startswith("."):
            continue
        h.update(f"{rel}:{f.stat().st_size}".encode())
        if f.suffix in (".json", ".safetensors", ".bin"):
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def oracle_key(base: str | Path, data: BenchmarkData, cfg: TrainConfig, **settings) -> str:
    blob = json.dumps(
        {
            "data": _fingerprint_samples(oracle_train(data)),
            "base": _fingerprint_model(Path(base)),
            "train": asdict(cfg),
            **settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def oracle_model(
    base: str | Path, data: BenchmarkData, cfg: TrainConfig, cache_dir: str | Path, *, lora_rank: int = 0
) -> Path:
    """The oracle's folder (trained now, or found in the cache)."""
    out = Path(cache_dir) / f"oracle-{oracle_key(base, data, cfg, lora_rank=lora_rank)}"
    if (out / "config.json").is_file():
        return out
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return finetune(load_model(base), oracle_train(data), cfg, out, lora_rank=lora_rank)
