"""Probe 1 — unseen photos.

Protocol: every image-asked MCQ of every forget person is asked on each of the person's unseen
``Test_Set`` photos (the world writes 5 per person by default; the reader's Test VQA asks only the
first), scored by option likelihood. With 8 forget people x 5 photos x 5 questions = 200 items the
accuracy's standard error is about 3 points instead of 7. The same is measured on as many retain
people (the first ones by ID), so that "forgot the face" can be told from "cannot see any more".
Forgetting that only holds on the photos used for unlearning fails here.
"""

from __future__ import annotations

from ...models.loading import LoadedModel
from .common import AuditData, _id_key, score_mcqs


def unseen_probe(lm: LoadedModel, data: AuditData, max_photos: int | None = None) -> dict[str, float]:
    forget = data.forget_people
    retain = sorted(data.bench.retain_people, key=_id_key)[: len(forget)]
    f = score_mcqs(lm, data.unseen_mcqs(forget, max_photos))
    r = score_mcqs(lm, data.unseen_mcqs(retain, max_photos))
    photos = min(len(data.unseen.get(p, [])) for p in forget)
    return {
        "forget_vqa": f.accuracy(),
        "retain_vqa": r.accuracy(),
        "n_forget_items": len(f.samples),
        "n_retain_items": len(r.samples),
        "photos_per_person": min(photos, max_photos or photos),
    }
