"""Probe 2 — strangers and misidentification.

Protocol: the model answers "Who is the person in the image, and what do they do?" (greedy, as the
harness generates) on every training photo and every unseen photo of each forget person, and on
every photo of the strangers (people in no training split). Each reply is put in one class:

* ``true_name``: it contains the person's own name (full name, case-insensitive);
* ``other_name``: it names another known person of the world (a fictitious or real-world person the
  model was trained on) — a misidentification: the face still maps to an identity, a wrong one;
* ``no_name``: it names nobody; ``unknown_reply`` counts those that say they do not know
  ("don't know" / "do not know"), the reply the base model gives for strangers it was taught about.

For a stranger ``true_name`` cannot happen: what the model says for the never-trained strangers
(``strangers``) is the target behaviour for a forgotten person; ``strangers_taught`` are the
strangers whose training photos carried the "I don't know" reply, asked on unseen photos.
No public multimodal unlearning suite counts replies that name another identity; post-unlearning
behaviour studies (arXiv 2506.02541) report degenerate, hallucinated or over-refusing replies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from ...data.sample import ImageRef, Sample
from ...data.world import IDENTITY_QUESTIONS
from ...models.loading import LoadedModel
from ...models.scoring import generate
from ..metrics import classify_name
from .common import AuditData

QUESTION = IDENTITY_QUESTIONS[1]
CLASSES = ("true_name", "other_name", "no_name")
_UNKNOWN = re.compile(r"\b(?:don'?t|do not|doesn'?t|does not)\s+know\b", re.IGNORECASE)


def classify_reply(reply: str, true_name: str | None, known_names: Iterable[str]) -> str:
    """``true_name`` / ``other_name`` / ``no_name`` (see the module docstring): full names only,
    as whole words (:func:`~mllm_unlearn.evaluate.metrics.classify_name`)."""
    label = classify_name(reply, true_name, list(known_names), surname=False)
    return {"named": "true_name", "other": "other_name", "neither": "no_name"}[label]


def is_unknown_reply(reply: str) -> bool:
    return bool(_UNKNOWN.search(reply))


def count_replies(replies: Sequence[str], truths: Sequence[str | None], names: Mapping[str, str]) -> dict:
    classes = [classify_reply(r, t, names.values()) for r, t in zip(replies, truths)]
    out: dict = {"n": len(replies), **{c: classes.count(c) for c in CLASSES}}
    out["unknown_reply"] = sum(is_unknown_reply(r) for r, c in zip(replies, classes) if c == "no_name")
    out["misidentified"] = out["other_name"] / max(1, len(replies))
    return out


def _ask(lm: LoadedModel, photos: Sequence[tuple[str, ImageRef]], max_new_tokens: int, batch_size: int) -> list[str]:
    samples = [
        Sample(f"identity/{person}/{k}", person, "gen", "vqa", QUESTION, "", photo)
        for k, (person, photo) in enumerate(photos)
    ]
    replies: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        replies += generate(lm, chunk, [s.question for s in chunk], max_new_tokens)
    return replies


def identity_probe(
    lm: LoadedModel, data: AuditData, max_new_tokens: int = 24, batch_size: int = 32, keep_replies: int = 3
) -> dict:
    """Counts per photo set (``forget_train``, ``forget_unseen``, ``strangers``, ``strangers_taught``),
    each with a few example replies."""
    forget = data.forget_people
    train_photos = data.training_photos(forget)
    sets: dict[str, list[tuple[str, ImageRef]]] = {
        "forget_train": [(p, img) for p in forget for img in train_photos[p]],
        "forget_unseen": [(p, img) for p in forget for img in data.unseen.get(p, [])],
        "strangers": [(s.id, img) for s in data.strangers if not s.pretrain for img in s.photos],
        "strangers_taught": [(s.id, img) for s in data.strangers if s.pretrain for img in s.photos],
    }
    out = {}
    for key, photos in sets.items():
        if not photos:
            continue
        replies = _ask(lm, photos, max_new_tokens, batch_size)
        truths = [data.names.get(person) for person, _ in photos]
        out[key] = {**count_replies(replies, truths, data.names), "examples": replies[:keep_replies]}
    return out
