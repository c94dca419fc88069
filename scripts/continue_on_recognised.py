"""Does more unlearning of the people a request left recognisable help? (docs/method.md, fifth pass)

Usage::

    python scripts/continue_on_recognised.py --cache CACHE --seeds 0 --rounds 2 --steps 50

``CACHE`` is an ``mllm-unlearn audit --seeds`` cache. Per world: cvf_ncu with the audit's default
``UnlearnConfig`` (seed = the world's), then up to ``--rounds`` rounds of ``--steps`` more steps whose forget
set is the people still above chance + 0.15 on their own training photos' MCQs (a check a deployment can
run: it needs only the request), the other forget people held at their tokens (``forgotten``, cvf_ncu's
``keep_forgotten``). Prints, before and after the extra rounds, unseen-photo forget VQA (all and per person),
training-photo forget VQA per person, Retain and Real-world VQA. ``--rounds 0`` is the default's run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from mllm_unlearn.evaluate.audit import load_audit_data
from mllm_unlearn.evaluate.audit.common import score_mcqs
from mllm_unlearn.evaluate.audit.unseen import RECOGNISED
from mllm_unlearn.methods import get_method
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people, stranger_samples, unlearn_stage


def on_training_photos(lm, audit) -> dict[str, float]:
    """Forget VQA per forget person on the photos unlearning trained on."""
    train = score_mcqs(lm, audit.image_mcqs("forget", audit.forget_people))
    return {p: train.accuracy([p]) for p in audit.forget_people}


def measure(lm, audit) -> dict:
    people = audit.forget_people
    unseen = score_mcqs(lm, audit.unseen_mcqs(people))
    return {
        "unseen": unseen.accuracy(),
        "unseen_per_person": {p: unseen.accuracy([p]) for p in people},
        "train_per_person": on_training_photos(lm, audit),
        "retain_vqa": score_mcqs(lm, audit.image_mcqs("retain")).accuracy(),
        "real_vqa": score_mcqs(lm, audit.image_mcqs("real")).accuracy(),
    }


def world(cache: str, seed: int, rounds: int, steps: int) -> dict:
    audit = load_audit_data(f"{cache}/seed{seed}/world", "forget_15")
    data = audit.bench
    forget, retain = split_people(data)
    strangers = stranger_samples(data)
    cfg, method = UnlearnConfig(seed=seed), get_method("cvf_ncu")
    lm = attach_adapters(load_model(f"{cache}/seed{seed}/vanilla"), retain, cfg, method, strangers)
    unlearn_stage(lm, method(), forget, retain, cfg, strangers=strangers)
    before = measure(lm, audit)
    chosen = []
    for r in range(rounds):
        train = before["train_per_person"] if r == 0 else on_training_photos(lm, audit)
        hard = sorted(p for p, v in train.items() if v > RECOGNISED)
        if not hard:
            break
        chosen.append(hard)
        unlearn_stage(
            lm,
            method(),
            [s for s in forget if s.person in hard],
            retain,
            replace(cfg, steps=steps, seed=seed + 1 + r),
            strangers=strangers,
            forgotten=[s for s in forget if s.person not in hard],
        )
    return {"seed": seed, "before": before, "rounds": chosen, "after": measure(lm, audit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in map(int, args.seeds.split(",")):
        print(json.dumps(world(args.cache, seed, args.rounds, args.steps)))


if __name__ == "__main__":
    main()
