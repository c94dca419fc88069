"""Noise-and-distill the visual module after unlearning (UNDO, Lee et al., 2025, "Distillation Robustifies
Unlearning", arXiv 2506.06278), issue #10's "deep, not redirected".

An unlearned model whose forgetting comes back after a short fine-tune still holds what it forgot: the
edit sits on top of weights that recognise the person. UNDO shrinks and perturbs those weights
(W <- (1 - a) W + a sigma_W N(0, 1), a = ``noise``, sigma_W the tensor's own standard deviation) and then
trains the perturbed copy (the student) to reproduce the unlearned model's (the teacher's) outputs on a
distillation set: behaviour is copied back, the part of the old weights the outputs no longer use is not.

Here only the visual module is distilled (the LLM is frozen by the method, so text-only logits stay
bit-identical): the student is the adapted layers of the vision tower and projector (the Linear layers
the update scope names, the ones a relearning fine-tune of the visual module moves), the teacher's
outputs are its visual tokens (the LLM's visual input), and the loss is their mean squared error,
normalised by the teacher tokens' variance. The distillation images are the images the request makes
available: the forget photos (whose teacher tokens are the forgotten ones), the retain photos and the
stranger photos, each with ``views`` augmented copies (:func:`~mllm_unlearn.data.augment.augmented_copies`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.augment import augmented_copies
from ..data.sample import Sample
from ..models.loading import LoadedModel
from ..models.scoring import concat_images, single_image_inputs
from ..nullspace import target_linears


@dataclass
class DistillConfig:
    """``steps``: AdamW steps of ``batch_size`` images (0: no distillation). ``noise``: a of the
    shrink-and-perturb (0: the student starts as the teacher; 1: from random weights of each tensor's
    scale). ``views``: augmented copies of each distillation image (strength ``augment``, as CVF's view
    pool), so the student learns the teacher's tokens around the photos, not only on them. Defaults:
    :class:`~mllm_unlearn.train.unlearn.UnlearnConfig`'s ``distill_*``."""

    steps: int
    noise: float
    lr: float
    views: int
    batch_size: int = 32
    augment: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"distill steps must be >= 0, got {self.steps}")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"distill noise must be in [0, 1], got {self.noise}")
        if self.lr <= 0:
            raise ValueError(f"distill lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"distill batch_size must be >= 1, got {self.batch_size}")
        if self.views < 0:
            raise ValueError(f"distill views must be >= 0, got {self.views}")


def _cosine(step: int, steps: int) -> float:
    """The learning rate's factor at ``step``: cosine decay from 1 to 0 (the cosine taken in float32)."""
    return 0.5 * (1 + torch.cos(torch.tensor(math.pi * step / max(1, steps))).item())


def distill_visual(lm: LoadedModel, images: Sequence[Sample], pattern: str, cfg: DistillConfig) -> list[dict]:
    """Shrink-and-perturb the weights of the Linear layers of ``lm.model`` (merged: no adapters) whose path
    fullmatches ``pattern``, then train those layers (weights and biases; AdamW, cosine decay to 0, no
    warm-up or clipping: its own few lines rather than :func:`~mllm_unlearn.train.loop.run`, whose warm-up,
    clipping and lr floor were not measured here) to give ``images`` and their augmented copies the
    visual tokens the model gave them before; in place, every other weight untouched. Layers whose
    output the tokens do not use (LLaVA's last CLIP layer) are perturbed like the others and get no
    gradient: they never reach the tokens. Returns the log rows (step, loss); deterministic for a seed and
    thread count. The teacher's tokens are computed once and kept in host memory (at 7B, 576 x 4096 bf16
    tokens are 4.7 MB an image)."""
    if not images:
        raise ValueError("distill: no images to distil on")
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    items = list(images) + augmented_copies(images, g, cfg.views, cfg.augment)
    model = lm.model
    model.eval()  # no dropout: the student copies the deterministic teacher
    singles = single_image_inputs(lm, items)  # encoded once
    device = next(model.parameters()).device
    with torch.no_grad():
        teacher = torch.cat(
            [
                lm.arch.image_features(model, concat_images(singles[i : i + cfg.batch_size])).cpu()
                for i in range(0, len(singles), cfg.batch_size)
            ]
        )
    scale = teacher.float().var().clamp_min(1e-12)
    layers = target_linears(model, pattern)
    params = [p for m in layers.values() for p in m.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for m in layers.values():
            w, sigma = m.weight, m.weight.std()
            w.mul_(1 - cfg.noise).add_(cfg.noise * sigma * torch.randn(w.shape, generator=g).to(w))
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    log = []
    try:
        for step in tqdm(range(cfg.steps), desc="distill", leave=False):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _cosine(step, cfg.steps)
            idx = torch.randperm(len(singles), generator=g)[: cfg.batch_size].tolist()
            out = lm.arch.image_features(
                model, {k: v.to(device) for k, v in concat_images([singles[i] for i in idx]).items()}
            )
            loss = (out.float() - teacher[idx].to(device).float()).pow(2).mean() / scale
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distill: loss {loss.item()} at step {step}; lower distill_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == cfg.steps - 1:
                log.append({"step": step, "distill_loss": loss.item()})
    finally:
        for p in params:
            p.requires_grad_(False)
    return log
