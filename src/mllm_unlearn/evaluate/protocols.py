"""Benchmark-specific protocol pieces the generic harness does not have, as pure functions.

UMU-Bench (Wang et al.) asks its MCQs differently from MLLMU-Bench: the options are listed inline,
``USER: <image>\\n{Q}\\nSelect answer in [optA, optB, optC, optD]\\nASSISTANT:``, and the reply is
matched to an option's *text*, not read as a letter -- exactly for the fictitious profiles, by the
closest string for the real people (``real_person``). It also reports cross-modal agreement: over
pairs of the same question asked text-only and with the image, the share answered right in both
modalities and wrong in both.

:func:`umu_mcq_body` gives the question body (the architecture's chat template adds ``USER:``,
``<image>`` and ``ASSISTANT:``; for LLaVA-1.5 the result is UMU-Bench's prompt), :func:`match_option_text`
reads a reply, :func:`pair_modalities` pairs per-item results by sample id and :func:`cross_modal`
aggregates the pairs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

#: ``{folder}/{person}/{task}-{modality}/{key}``: the id layout of the readers' task items
_ITEM_ID = re.compile(r"(?P<head>.*)/(?P<task>[a-z]+)-(?P<modality>vqa|qa)/(?P<key>[^/]*)")


def umu_mcq_body(question: str, options: Mapping[str, str]) -> str:
    """UMU-Bench's MCQ body: the question, then ``Select answer in [...]`` listing the option texts
    in letter order. The list is written as Python prints a list of strings (``str(list)``, quotes
    included), which is how UMU-Bench's evaluation code builds it."""
    texts = [options[letter] for letter in sorted(options)]
    return f"{question.strip()}\nSelect answer in {texts!s}"


def _norm(text: str) -> str:
    """Lower case, single spaces, no punctuation at the ends."""
    return " ".join((text or "").lower().split()).strip(" .,;:!?\"'()[]")


def match_option_text(reply: str, options: Mapping[str, str], fuzzy: bool) -> str | None:
    """The letter of the option whose text the reply gives, or ``None``.

    ``fuzzy=False`` (UMU-Bench's fictitious profiles): an option counts when its text occurs in the
    reply as whole words, case- and space-insensitively; an option found only inside another found
    one does not count (``"York"`` in ``"New York City"``); no match, or two different options
    named (``"Paris or Boston"``), gives ``None``.
    ``fuzzy=True`` (``real_person``): the option closest to the reply by
    :class:`difflib.SequenceMatcher` ratio (ties: the earlier letter); ``None`` for an empty reply.
    """
    said = _norm(reply)
    if not said or not options:
        return None
    texts = {letter: _norm(text) for letter, text in sorted(options.items())}
    if fuzzy:
        best = max(
            texts, key=lambda letter: (difflib.SequenceMatcher(None, said, texts[letter]).ratio(), -ord(letter[0]))
        )
        return best
    found = {
        letter: text for letter, text in texts.items() if text and re.search(rf"(?<!\w){re.escape(text)}(?!\w)", said)
    }
    # an option found only as part of another found option ("York" in "New York City") does not count
    kept = {
        letter: text
        for letter, text in found.items()
        if not any(other != text and text in other for other in found.values())
    }
    return next(iter(kept)) if len(set(kept.values())) == 1 else None


def cross_modal(pairs: Sequence[tuple[bool, bool]]) -> dict[str, float]:
    """UMU-Bench's cross-modal agreement over (text-only correct, with-image correct) pairs:
    ``both_right`` and ``both_wrong`` are the shares of pairs right, resp. wrong, in both."""
    if not pairs:
        raise ValueError("cross_modal needs at least one (unimodal, multimodal) pair")
    n = len(pairs)
    return {
        "both_right": sum(bool(a) and bool(b) for a, b in pairs) / n,
        "both_wrong": sum(not a and not b for a, b in pairs) / n,
    }


def pair_modalities(correct: Mapping[str, bool | float]) -> list[tuple[bool, bool]]:
    """(text-only, with-image) pairs from per-item correctness keyed by sample id.

    Two ids pair when they differ only in the modality part ``{task}-qa`` / ``{task}-vqa``
    (``umu``'s ids keep the item's key from its dict, so UMU-Bench's unimodal and multimodal
    versions of a question pair up). Unpaired ids are skipped; pairs come in id order. A score
    counts as correct when it is truthy (accuracies are 1.0 / 0.0).
    """
    by_key: dict[tuple[str, str, str], dict[str, bool]] = {}
    for item_id, score in correct.items():
        m = _ITEM_ID.fullmatch(item_id)
        if m:
            by_key.setdefault((m["head"], m["task"], m["key"]), {})[m["modality"]] = bool(score)
    return [(mods["qa"], mods["vqa"]) for key, mods in sorted(by_key.items()) if len(mods) == 2]
