"""Seeding and endless mini-batch streams whose batch t depends on (seed, t) alone."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(
    items: Sequence[T],
    batch_size: int,
    seed: int,
    start_step: int = 0,
    lengths: Sequence[int] | None = None,
    group: int = 32,
) -> Iterator[list[T]]:
    """Endless mini-batches, reshuffled every epoch; batch t is a function of (seed, t) alone,
    so a resumed run sees exactly the batches an uninterrupted one would have.

    With ``lengths``, each epoch's shuffled order is cut into windows of ``group`` batches, each window
    is sorted by length and the batches are shuffled again (Hugging Face's ``group_by_length``):
    similar lengths share a batch, so far less compute goes to padding.
    """
    if not items:
        raise ValueError("cannot draw batches from an empty set")
    per_epoch = max(1, len(items) // batch_size)
    epoch_batches: tuple[int, list[np.ndarray]] | None = None
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        if epoch_batches is None or epoch_batches[0] != epoch:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(len(items))[: per_epoch * batch_size]
            if lengths is not None:
                window = group * batch_size
                order = np.concatenate(
                    [sorted(order[i : i + window], key=lambda j: lengths[j]) for i in range(0, len(order), window)]
                )
            chunks = [order[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
            if lengths is not None:
                chunks = [chunks[i] for i in rng.permutation(per_epoch)]
            epoch_batches = (epoch, chunks)
        yield [items[i] for i in epoch_batches[1][k]]
        step += 1
