"""Probe 6b — loss-based membership inference between forget photos and stranger photos.

Protocol: a "photo" is scored by the model's mean answer-token loss over its person's image-asked
profile questions (the MCQ questions answered with the right option's text, and the image-asked
generation items) asked on that photo. Members are the forget people's training photos; non-members
are the never-trained strangers' photos (same question templates, their own profile answers).
``mia_auc`` = P(a member's loss < a non-member's loss), ties counting half (the LOSS attack of
TOFU / MUSE's privleak). 0.5 = forget photos look like never-seen people's, which is what the
oracle gets (``mia_auc_oracle``); near 1 = the model still treats the forget photos as known.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...models.loading import LoadedModel
from .common import AuditData, answer_nll, with_image


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """P(score of a random member > score of a random non-member), ties 1/2 (Mann-Whitney U / (n m))."""
    a, b = np.asarray(members, dtype=float), np.asarray(non_members, dtype=float)
    if not len(a) or not len(b):
        return float("nan")
    return float((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())


def photo_losses(lm: LoadedModel, data: AuditData) -> tuple[np.ndarray, np.ndarray]:
    """(member losses, non-member losses), one per photo."""
    forget = data.forget_people
    profile = {
        p: [
            s for s in data.bench.splits["forget"] if s.person == p and s.modality == "vqa" and s.task in ("mcq", "gen")
        ]
        for p in forget
    }
    groups = [
        with_image(profile[p], img, f"member/{p}/{k}")
        for p, imgs in data.training_photos(forget).items()
        for k, img in enumerate(imgs)
    ]
    n_members = len(groups)
    groups += [
        with_image(s.items, img, f"stranger/{s.id}/{k}")
        for s in data.strangers
        if not s.pretrain
        for k, img in enumerate(s.photos)
    ]
    flat = [s for g in groups for s in g]
    losses = answer_nll(lm, flat)
    per_photo, i = [], 0
    for g in groups:
        per_photo.append(float(losses[i : i + len(g)].mean()))
        i += len(g)
    return np.array(per_photo[:n_members]), np.array(per_photo[n_members:])


def mia_probe(lm: LoadedModel, data: AuditData) -> dict[str, float]:
    members, non_members = photo_losses(lm, data)
    return {
        "mia_auc": auc(-members, -non_members),
        "member_loss": float(members.mean()),
        "non_member_loss": float(non_members.mean()) if len(non_members) else float("nan"),
        "n_members": len(members),
        "n_non_members": len(non_members),
    }
