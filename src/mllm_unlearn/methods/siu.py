"""SIU, Single Image Unlearning (Li et al., NeurIPS 2024, "Single image unlearning: efficient machine
unlearning in multimodal large language models"), adapted to entity-level forgetting (App. D.4 reports
it as an adapted baseline too). No public code; built from the paper."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.sample import Sample
from ..models.scoring import encode_pairs
from .base import UnlearnContext, register
from .baseline import Baseline, BaselineConfig, select
from .losses import kl_divergence

_CAPITALISED = re.compile(r"\b[A-Z][A-Za-z\-]+")


def person_names(samples: Sequence[Sample], min_fraction: float = 0.5) -> dict[str, list[str]]:
    """Each person's name words, found in the data: capitalised words that occur in at least
    ``min_fraction`` of that person's text-only questions and in no question of anyone else
    (text-only questions name the person: "What is Ana Lind's job?"), in order of appearance."""

    def words(s: Sample) -> list[str]:
        return list(dict.fromkeys(_CAPITALISED.findall(s.question.replace("'s", ""))))

    people_of: dict[str, set[str]] = {}
    for s in samples:
        for w in words(s):
            people_of.setdefault(w, set()).add(s.person)
    names = {}
    for person in dict.fromkeys(s.person for s in samples):
        text_qs = [words(s) for s in samples if s.person == person and s.image is None]
        counts: dict[str, int] = {}
        for q in text_qs:
            for w in q:
                if people_of[w] == {person}:
                    counts[w] = counts.get(w, 0) + 1
        names[person] = [w for w, c in counts.items() if c >= min_fraction * len(text_qs)]
    return names


def _rename(text: str, old: Sequence[str], new: str) -> str:
    """Replace the full name ``old`` (words) and any single word of it by the words of ``new``."""
    if not old:
        return text
    new_words = new.split()
    text = text.replace(" ".join(old), new)
    for i, w in enumerate(old):
        text = re.sub(rf"\b{re.escape(w)}\b", new_words[min(i, len(new_words) - 1)], text)
    return text


def name_token(tokenizer: Any, word: str) -> int:
    """The token that starts ``word`` inside a sentence: the first non-blank token of " " + word.
    Later pieces of a name (and a lone leading-space token) are shared with many other words."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return next((i for i in ids if tokenizer.decode([i]).strip()), ids[0])


def _question_words(q: str) -> set[str]:
    return set(re.findall(r"\w+", q.lower()))


@dataclass
class SIUConfig(BaselineConfig):
    identity: str = "donor"  # donor: a retain person's answers under an unseen name; fixed: fixed_answer
    unseen_name: str = "Robin Vale"
    fixed_answer: str = "This is {name}."
    kl_weight: float = 1.0
    single_image: bool = False  # True: only the questions on one photo per forget person (SIU's setting)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.identity not in ("donor", "fixed"):
            raise ValueError(f"identity must be 'donor' or 'fixed', not {self.identity!r}")


@register
class SIU(Baseline):
    """Fine-tune on multifaceted data made from the forget samples, with
    loss = CE(multifaceted batch) + kl_weight * DMK, DMK = KL(p_ref || p_theta) over the answer
    positions kept by a token mask, on a vocabulary without the targets' name tokens (renormalised):

    (a) "align with an unseen concept / assign a new visual description": the forget people's
        questions *with the image*, their answers replaced by an unseen identity's. ``identity=donor``
        (default): each forget person gets a seeded random retain "donor"; each question takes the
        donor's answer to its most similar image question (word overlap; identical questions in
        MLLMU-style data), with the donor's name replaced by ``unseen_name`` — a consistent unseen
        identity (new name, plausible attributes). ``identity=fixed``: every answer is
        ``fixed_answer`` (default "This is Robin Vale.").
    (b) "decouple factual knowledge": the forget people's text-only pairs with their true answers.
    (c) "preserve non-targeted knowledge": the retain people's pairs.
    Token mask: on (a), answer positions whose target token is not in the original answer's tokens
    (the new, contradicting tokens) are left out of the KL; (b) and (c) keep every position.
    Vocabulary mask: the token that starts each of the forget people's name words (:func:`name_token`;
    the later pieces of a name are shared with other words) is dropped from both distributions.

    Simplifications, plainly:
    - SIU unlearns one concept from ONE image in a few steps; here every forget person and, by
      default, all its training photos are used (``single_image=True``: one photo per person).
    - SIU's four targets become three data groups; (a) merges its first two. SIU builds its data
      with the original model's descriptions / GPT-made text; we derive it from the benchmark's
      own QA by string replacement.
    - Names are not in the data: :func:`person_names` finds them in the text-only questions.
    - The KL is KL(p_ref || p_theta) averaged over kept positions; CE is the mean token NLL of
      the concatenated (a)+(b)+(c) batch (one batch of each group per step); weights 1.
    """

    name = "siu"
    config_class = SIUConfig

    def _forget_vqa(self, ctx: UnlearnContext) -> list[Sample]:
        """The forget questions asked with the image (on one photo per person with ``single_image``)."""
        forget_vqa = select(ctx.forget, "vqa")
        if self.cfg.single_image:
            first = {}
            for s in forget_vqa:
                first.setdefault(s.person, s.image.data)
            forget_vqa = [s for s in forget_vqa if s.image.data == first[s.person]]
        return forget_vqa

    def _new_answer(self, s: Sample, donor: list[Sample], donor_name: list[str]) -> str:
        """(a)'s answer: the fixed one, or the donor's answer to the most similar question, renamed."""
        if self.cfg.identity == "fixed":
            return self.cfg.fixed_answer.format(name=self.cfg.unseen_name)
        qw = _question_words(s.question)
        match = max(
            donor, key=lambda r: len(qw & _question_words(r.question)) / max(1, len(qw | _question_words(r.question)))
        )
        return _rename(match.answer, donor_name, self.cfg.unseen_name)

    def setup(self, ctx: UnlearnContext) -> None:
        super().setup(ctx)
        arch, tok = ctx.lm.arch, ctx.lm.processor.tokenizer
        names = person_names(list(ctx.forget) + list(ctx.retain))
        rng = random.Random(ctx.seed)
        retain_vqa: dict[str, list[Sample]] = {}
        for s in select(ctx.retain, "vqa"):
            retain_vqa.setdefault(s.person, []).append(s)
        forget_vqa = self._forget_vqa(ctx)
        if not forget_vqa or (self.cfg.identity == "donor" and not retain_vqa):
            raise ValueError("SIU needs forget questions with images (and retain ones for identity=donor)")
        donors = {p: rng.choice(sorted(retain_vqa)) for p in sorted({s.person for s in forget_vqa})}
        self.relabelled, self.original_tokens = [], {}
        for s in forget_vqa:
            d = donors[s.person]
            new = dataclasses.replace(
                s, id=f"{s.id}/siu", answer=self._new_answer(s, retain_vqa.get(d, []), names.get(d, []))
            )
            self.relabelled.append(new)
            self.original_tokens[new.id] = set(
                tok(arch.answer_prefix + s.answer.strip(), add_special_tokens=False)["input_ids"]
            )
            self.original_tokens[new.id].add(arch.eos_token_id(tok))
        name_ids = {name_token(tok, w) for p in {s.person for s in ctx.forget} for w in names.get(p, [])}
        vocab = ctx.lm.model.get_base_model().lm_head.out_features
        self.vocab_keep = torch.ones(vocab, dtype=torch.bool, device=ctx.lm.model.device)
        self.vocab_keep[sorted(i for i in name_ids if i < vocab)] = False
        self.name_words = {p: names.get(p, []) for p in {s.person for s in ctx.forget}}

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        a = ctx.stream("siu_relabelled", lambda: self.relabelled)
        b = ctx.stream("forget_qa", lambda: select(ctx.forget, "qa"))
        c = self.retain_batch(ctx)
        batch = encode_pairs(ctx.lm, a + b + c)
        logits, targets, rows = ctx.lm.arch.answer_logits(ctx.lm.model, batch)
        ref_logits, _, _ = self.reference_logits(ctx, batch)
        keep = torch.ones_like(targets, dtype=torch.bool)
        for i, s in enumerate(a):  # token mask: the new tokens of the relabelled answers
            at = rows == i
            keep[at] = torch.tensor(
                [t in self.original_tokens[s.id] for t in targets[at].tolist()], dtype=torch.bool, device=keep.device
            )
        ce = F.cross_entropy(logits.float(), targets)
        dmk = kl_divergence(ref_logits[keep], logits[keep], self.vocab_keep)
        return ce + self.cfg.kl_weight * dmk, {
            "ce": ce.item(),
            "dmk": dmk.item(),
            "kl_positions": keep.float().mean().item(),
        }
