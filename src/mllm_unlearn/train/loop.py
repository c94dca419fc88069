"""The training loop: short enough to read in one sitting.

The loop knows nothing about data or methods: each step it calls ``loss_fn(step)``, which fetches its
own batches and returns ``(loss, logs)``. Fine-tuning, every unlearning method and every baseline run
through this same loop.

Several processes (``accelerate launch``, see :mod:`mllm_unlearn.train.distributed`): every process
draws the same global batch and its loss function uses only its shard of it; the step runs as one
forward of the accelerate-prepared model, gradients are averaged, and every process takes the same
update. Only the main process shows progress and writes the log. One process: nothing changes.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed

T = TypeVar("T")


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 5e-4
    batch_size: int = 32
    warmup: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batches(items: Sequence[T], batch_size: int, seed: int, start_step: int = 0,
            lengths: Sequence[int] | None = None, group: int = 32) -> Iterator[list[T]]:
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
                order = np.concatenate([sorted(order[i:i + window], key=lambda j: lengths[j])
                                        for i in range(0, len(order), window)])
            chunks = [order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
            if lengths is not None:
                chunks = [chunks[i] for i in rng.permutation(per_epoch)]
            epoch_batches = (epoch, chunks)
        yield [items[i] for i in epoch_batches[1][k]]
        step += 1


def run(params: Iterable[torch.nn.Parameter], loss_fn: Callable[[int], tuple[torch.Tensor, dict]],
        cfg: TrainConfig, *, desc: str = "train", log_file: Path | None = None, start_step: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
        model: torch.nn.Module | None = None) -> list[dict]:
    """Optimise ``params`` for ``cfg.steps`` steps with AdamW; returns the logged rows.

    A non-finite loss stops the run with an error naming the step (nothing is saved by the loop).
    ``on_step(step, optimizer)`` runs after each update (checkpointing, evaluation).

    ``model``, the module that owns ``params``, is needed with several processes: it is prepared
    (DDP, DeepSpeed, FSDP) together with the optimiser, and each step's ``loss_fn`` runs inside its
    forward. Logged losses and terms are then averaged over the processes, i.e. those of the global
    batch, and every process checks that loss, so all stop together on a NaN.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check the update scope / target modules")
    opt = optimizer or torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    compute = loss_fn
    if distributed.active():
        if model is None:
            raise ValueError(f"{desc}: training on several processes needs run(..., model=...)")
        step_module, opt = distributed.prepare(model, opt)
        compute = lambda step: step_module(loss_fn, step)  # noqa: E731
    main = distributed.is_main()
    history: list[dict] = []
    bar = tqdm(range(start_step, cfg.steps), desc=desc, initial=start_step, total=cfg.steps, dynamic_ncols=True,
               disable=not main)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
        loss, logs = compute(step)
        global_loss = distributed.mean(loss.detach())  # NaN on every process if NaN on any
        if not torch.isfinite(global_loss):
            raise FloatingPointError(f"{desc}: loss is {global_loss.item()} at step {step} (terms: {logs}); "
                                     "lower the learning rate or check the data")
        distributed.backward(loss)
        if cfg.grad_clip > 0:
            distributed.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = {"step": step, "lr": opt.param_groups[0]["lr"], "loss": global_loss.item(),
                   **{k: float(v) for k, v in distributed.mean_logs(logs).items()}}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if log_file is not None and main:
                with open(log_file, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        if on_step is not None:
            on_step(step, opt)
    return history
