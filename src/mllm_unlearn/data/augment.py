"""Random views of photos: crops, shifts, colour and noise (issue #10, "forget the identity, not the
picture"). One transformation (:func:`_augment`) serves two encodings: already-normalised pixel batches
(:func:`augment_pixels`, CVF's per-step ``views``) and RGB photos (:func:`augment_image`, encoded by any
image processor: CVF's ``view_pool`` and NCU calibration's ``UnlearnConfig.calibrate_views``), and
:func:`augmented_copies` turns photos into samples whose image is such a view."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from .sample import ImageRef, Sample


def _augment(img: torch.Tensor, generator: torch.Generator, strength: float, unit: float) -> torch.Tensor:
    """One random view of a (C, H, W) image: a crop of (1 - 0.3 s) to 1 of each side resized back (scale
    and shift), a circular shift of up to 0.1 s of the side, a per-channel gain 1 + 0.2 s N(0, 1) and
    offset 0.2 s N(0, 1), and Gaussian noise of std 0.1 s; offset and noise in multiples of ``unit``
    (the pixels' standard deviation)."""
    c, h, w = img.shape
    frac = 1 - 0.3 * strength * torch.rand((), generator=generator).item()
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (), generator=generator))
    crop = img[:, top : top + ch, left : left + cw]
    img = torch.nn.functional.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    m = max(1, round(0.1 * strength * min(h, w)))
    dy, dx = (int(v) for v in torch.randint(-m, m + 1, (2,), generator=generator))
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    gain = 1 + 0.2 * strength * torch.randn(c, 1, 1, generator=generator)
    offset = 0.2 * unit * strength * torch.randn(c, 1, 1, generator=generator)
    return img * gain + offset + 0.1 * unit * strength * torch.randn(img.shape, generator=generator)


def augment_pixels(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """A random view (:func:`_augment`) of each image of a (B, C, H, W) pixel batch, already normalised
    (unit std). ``strength`` s = 0 returns ``x`` unchanged."""
    if x.dim() != 4:
        raise ValueError(f"augment_pixels needs (B, C, H, W) pixels, not shape {tuple(x.shape)}")
    if strength == 0:
        return x
    return torch.stack([_augment(img, generator, strength, 1.0) for img in x]).to(x.dtype)


def augment_image(img: Image.Image, generator: torch.Generator, strength: float = 1.0) -> Image.Image:
    """A random view (:func:`_augment`) of an RGB photo in pixel levels, so that any image processor can
    encode it: offset and noise in units of 70 levels (about CLIP's normalised pixel std of 0.27 x 255),
    i.e. offset std 14 s and noise std 7 s levels. ``strength`` s = 0 returns the photo unchanged."""
    if strength == 0:
        return img
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W)
    x = _augment(x, generator, strength, 70.0)
    return Image.fromarray(x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def augmented_copies(
    photos: Sequence[Sample], generator: torch.Generator, copies: int, strength: float
) -> list[Sample]:
    """``copies`` augmented copies of each photo (:func:`augment_image`; copy k of every photo, then copy
    k + 1), as samples of the same person and question whose image is the copy (PNG): to every other part
    of the library they are photos, so their pixels and reference tokens are encoded and cached like the
    photos'."""
    out = []
    for k in range(copies):
        for s in photos:
            img = augment_image(s.image.load(), generator, strength)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            ref = ImageRef(buf.getvalue(), f"{s.image.source} (augmented copy {k + 1})")
            out.append(replace(s, id=f"{s.id}#view{k + 1}", image=ref))
    return out
