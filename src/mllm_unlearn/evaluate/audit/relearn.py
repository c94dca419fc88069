"""Probes 3 and 4 — relearning attack and benign fine-tuning.

Relearning (the split-half protocol of Deeb & Roger 2024, arXiv 2410.08827): the forget people are
sorted by ID and split alternately into halves A and B; a copy of the (merged) unlearned model is
fine-tuned, all weights, on half A's training pairs only, and forget VQA of half B (canonical photos,
and unseen photos) is measured before and after. ``recovery`` = after - before: forgetting that was
only suppression comes back for people never shown during the attack. ``both_halves`` runs the
protocol both ways (A then B attacked) and pools them: the same quantity, measured on every forget person.

Benign fine-tuning: the same budget on the retain people's training pairs only (what a downstream
user might do; cf. Łucki et al. 2024, arXiv 2409.18025, where unrelated data restores unlearned
knowledge); forget VQA and unseen-photo forget VQA before and after.

Budget (:class:`AttackBudget`, a :class:`~mllm_unlearn.train.loop.TrainConfig`): 60 steps, lr 1e-4
constant, batch 8, AdamW, gradient clip 1.0, every weight trained (``scope="all"``). ``scope`` narrows
the attack to the LLM's Linear layers (``llm``: an attacker who teaches the language model to read
the edited visual tokens), to the vision tower's and projector's (``visual``: one who undoes the
visual edit) or the projector's alone; comparing them says which way a method's forgetting comes back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from ...data.sample import Sample
from ...models.loading import LoadedModel
from ...models.scoring import answer_nll
from ...runtime.batching import batches, seed_everything
from ...train.finetune import select_trainable
from ...train.loop import TrainConfig, run
from .common import AuditData, score_mcqs

ATTACK_SCOPES = ("all", "llm", "visual", "projector")


@dataclass
class AttackBudget(TrainConfig):
    """The attack's fine-tune: all weights, AdamW, constant learning rate (no warm-up, no decay)."""

    steps: int = 60
    lr: float = 1e-4
    batch_size: int = 8
    warmup: int = 0
    min_lr_ratio: float = 1.0
    scope: str = "all"

    def __post_init__(self) -> None:
        if self.scope not in ATTACK_SCOPES:
            raise ValueError(f"AttackBudget.scope: {self.scope!r} is not one of {', '.join(ATTACK_SCOPES)}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(
                f"AttackBudget: steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1 and "
                f"lr ({self.lr}) > 0"
            )


def finetune_copy(
    lm: LoadedModel,
    train: Sequence[Sample],
    budget: AttackBudget,
    *,
    trainable: Callable[[str], bool] | None = None,
    on_step: Callable[[torch.nn.Module], None] | None = None,
) -> LoadedModel:
    """A copy of ``lm`` fine-tuned (the weights of ``budget.scope``, constant lr) on ``train``; ``lm``
    is unchanged. For diagnostics (``scripts/relearn_route.py``): ``trainable``, a predicate over parameter
    names, replaces the scope; ``on_step(model)`` runs after every update (e.g. to project the change)."""
    seed_everything(budget.seed)
    model = copy.deepcopy(lm.model)
    if trainable is None:
        select_trainable(model, lm.arch, budget.scope)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
    model.train()
    work = LoadedModel(model, lm.processor, lm.arch)
    data = batches(list(train), budget.batch_size, budget.seed)
    cfg = replace(budget, log_every=max(1, budget.steps))
    run(
        model.parameters(),
        lambda step: (answer_nll(work, next(data)), {}),
        cfg,
        desc="audit-finetune",
        on_step=None if on_step is None else lambda step, opt: on_step(model),
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return work


def halves(people: Sequence[str]) -> tuple[list[str], list[str]]:
    people = list(people)
    if len(people) < 2:
        raise ValueError("the relearning attack needs at least 2 forget people")
    return people[0::2], people[1::2]


def _vqa(lm: LoadedModel, data: AuditData, people: Sequence[str]) -> tuple[float, float]:
    return (
        score_mcqs(lm, data.image_mcqs("forget", people)).accuracy(),
        score_mcqs(lm, data.unseen_mcqs(people)).accuracy(),
    )


def _attack(
    lm: LoadedModel, data: AuditData, train: Sequence[Sample], people: Sequence[str], budget, **finetune
) -> dict:
    """Forget VQA of ``people`` (canonical and unseen photos) before and after fine-tuning a copy on
    ``train`` (``finetune``: :func:`finetune_copy`'s keywords); the retain VQA of the fine-tuned copy."""
    before, unseen_before = _vqa(lm, data, people)
    tuned = finetune_copy(lm, train, budget, **finetune)
    after, unseen_after = _vqa(tuned, data, people)
    retain_after = score_mcqs(tuned, data.image_mcqs("retain")).accuracy()
    del tuned
    return {
        "forget_vqa_before": before,
        "forget_vqa_after": after,
        "recovery": after - before,
        "unseen_vqa_before": unseen_before,
        "unseen_vqa_after": unseen_after,
        "unseen_recovery": unseen_after - unseen_before,
        "retain_vqa_after": retain_after,
        "n_train": len(train),
        "budget": asdict(budget),
    }


def _one_way(lm: LoadedModel, data: AuditData, attack, held_out, budget, **finetune) -> dict:
    train = [s for s in data.bench.train if s.person in set(attack)]
    return {
        **_attack(lm, data, train, held_out, budget, **finetune),
        "attack_people": list(attack),
        "held_out_people": list(held_out),
    }


def relearn_probe(
    lm: LoadedModel, data: AuditData, budget: AttackBudget = AttackBudget(), *, both_halves: bool = False, **finetune
) -> dict:
    """Attack half A, measure half B (the protocol). ``both_halves`` also attacks B and measures A, on a fresh
    copy of ``lm``, and pools the two ways: every forget person is then measured once, each on the copy that was
    attacked with the others, and the accuracies (before, after, unseen) are the two ways' means weighted by their
    questions. The A-to-B way is unchanged (``"ways"[0]`` is the one-way result to the last digit); see
    :attr:`~mllm_unlearn.evaluate.audit.card.AuditConfig.relearn_both_halves` for why."""
    a, b = halves(data.forget_people)
    first = _one_way(lm, data, a, b, budget, **finetune)
    if not both_halves:
        return first
    second = _one_way(lm, data, b, a, budget, **finetune)
    ways = [first, second]
    # each way's questions weigh its accuracies
    n_forget = [len(data.image_mcqs("forget", w["held_out_people"])) for w in ways]
    n_unseen = [len(data.unseen_mcqs(w["held_out_people"])) for w in ways]
    pooled = {
        key: sum(w[key] * k for w, k in zip(ways, n)) / sum(n)
        for key, n in (
            ("forget_vqa_before", n_forget),
            ("forget_vqa_after", n_forget),
            ("unseen_vqa_before", n_unseen),
            ("unseen_vqa_after", n_unseen),
        )
    }
    pooled["recovery"] = pooled["forget_vqa_after"] - pooled["forget_vqa_before"]
    pooled["unseen_recovery"] = pooled["unseen_vqa_after"] - pooled["unseen_vqa_before"]
    pooled["retain_vqa_after"] = (first["retain_vqa_after"] + second["retain_vqa_after"]) / 2
    return {
        **pooled,
        "n_train": first["n_train"] + second["n_train"],
        "budget": first["budget"],
        "ways": ways,
    }


def benign_probe(lm: LoadedModel, data: AuditData, budget: AttackBudget = AttackBudget()) -> dict:
    retain = data.bench.retain_people
    train = [s for s in data.bench.train if s.person in retain]
    return _attack(lm, data, train, data.forget_people, budget)
