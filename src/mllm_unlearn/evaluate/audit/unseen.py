"""Probe 1 — unseen photos.

Protocol: every image-asked MCQ of every forget person is asked on each of the person's unseen
``Test_Set`` photos (the world writes 5 per person by default; the reader's Test VQA asks only the
first), scored by option likelihood. With 8 forget people x 5 photos x 5 questions = 200 items the
accuracy's standard error is about 3 points instead of 7. The same is measured on as many retain
people (the first ones by ID), so that "forgot the face" can be told from "cannot see any more".
Forgetting that only holds on the photos used for unlearning fails here.

A request is a person's: the mean hides people it left recognisable (on the development worlds three
of eight at 0.6-0.64 while the others sat at 0.08-0.36). ``per_person`` gives each forget person's
accuracy (25 items with 5 photos) and ``still_recognised`` the share above chance + 0.15, issue #10's
bound.
"""

from __future__ import annotations

from ...models.loading import LoadedModel
from .common import CHANCE, AuditData, _id_key, score_mcqs

#: a forget person above this unseen-photo forget VQA counts as still recognised (chance + 0.15)
RECOGNISED = CHANCE + 0.15


def unseen_probe(lm: LoadedModel, data: AuditData, max_photos: int | None = None) -> dict:
    forget = data.forget_people
    retain = sorted(data.bench.retain_people, key=_id_key)[: len(forget)]
    f = score_mcqs(lm, data.unseen_mcqs(forget, max_photos))
    r = score_mcqs(lm, data.unseen_mcqs(retain, max_photos))
    photos = min(len(data.unseen.get(p, [])) for p in forget)
    per_person = {p: f.accuracy([p]) for p in forget}
    return {
        "forget_vqa": f.accuracy(),
        "still_recognised": sum(v > RECOGNISED for v in per_person.values()) / len(forget),
        "per_person": per_person,
        "retain_vqa": r.accuracy(),
        "n_forget_items": len(f.samples),
        "n_retain_items": len(r.samples),
        "photos_per_person": min(photos, max_photos or photos),
    }
