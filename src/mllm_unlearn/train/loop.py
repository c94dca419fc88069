"""The training loop: short enough to read in one sitting.

The loop knows nothing about data or methods: each step it calls ``loss_fn(step)``, which fetches its
own batches and returns ``(loss, logs)``. Fine-tuning, every unlearning method and every baseline run
through this same loop.

Several processes (``accelerate launch``, see :mod:`mllm_unlearn.runtime.distributed`): every process
draws the same global batch and its loss function uses only its shard of it; the step runs as one
forward of the accelerate-prepared model, gradients are averaged, and every process takes the same
update. Only the main process shows progress and writes the log. One process: nothing changes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..runtime import distributed


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run(
    params: Iterable[torch.nn.Parameter],
    loss_fn: Callable[[int], tuple[torch.Tensor, dict]],
    cfg: TrainConfig,
    *,
    desc: str = "train",
    log_file: Path | None = None,
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    model: torch.nn.Module | None = None,
) -> list[dict]:
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
        compute = lambda step: step_module(loss_fn, step)
    main = distributed.is_main()
    history: list[dict] = []
    bar = tqdm(
        range(start_step, cfg.steps),
        desc=desc,
        initial=start_step,
        total=cfg.steps,
        dynamic_ncols=True,
        disable=not main,
    )
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
        loss, logs = compute(step)
        global_loss = distributed.mean(loss.detach())  # NaN on every process if NaN on any
        if not torch.isfinite(global_loss):
            raise FloatingPointError(
                f"{desc}: loss is {global_loss.item()} at step {step} (terms: {logs}); "
                "lower the learning rate or check the data"
            )
        distributed.backward(loss)
        if cfg.grad_clip > 0:
            distributed.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = {
                "step": step,
                "lr": opt.param_groups[0]["lr"],
                "loss": global_loss.item(),
                **{k: float(v) for k, v in distributed.mean_logs(logs).items()},
            }
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if log_file is not None and main:
                with open(log_file, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        if on_step is not None:
            on_step(step, opt)
    return history
