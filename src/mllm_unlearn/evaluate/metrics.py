"""Scoring one reply: MCQ letter parsing, cloze matching, ROUGE-L (paper App. C.2, Eq. 19-20)."""

from __future__ import annotations

import re
from functools import lru_cache

_CHOICE = re.compile(
    r"^\s*(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)?\s*(?:is)?\s*[:\-]?\s*"
    r"[\(\[]?(?P<letter>[A-Za-z])[\)\]]?(?P<after>.?)",
    re.IGNORECASE | re.DOTALL,
)


def parse_choice(reply: str, letters: str = "ABCD") -> str | None:
    """The option letter a reply gives, or ``None``.

    MLLMU-Bench reads the first character of the reply; we also accept the usual wrappers
    (``"Answer: B"``, ``"(b)"``, ``"The answer is C."``). A lower-case letter counts only when it
    stands alone or before punctuation, so that ``"a baker"`` is not read as option A.
    """
    m = _CHOICE.match(reply or "")
    if not m:
        return None
    letter, after = m.group("letter"), m.group("after")
    if letter.upper() not in letters:
        return None
    if after and after.isalnum():  # "Bob", "answered": a word, not a letter
        return None
    if letter.islower() and after and after.isspace():
        return None
    return letter.upper()


def cloze_correct(reply: str, gold: str) -> bool:
    """MLLMU-Bench's cloze rule: the gold words appear in the reply (case- and space-insensitive)."""
    norm = lambda s: " ".join(s.lower().split())
    return bool(norm(gold)) and norm(gold) in norm(reply)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-L of a reply against the reference (``rouge_score`` with the stemmer, as MLLMU-Bench):
    recall = LCS/|ref|, precision = LCS/|pred|, f = their harmonic mean (Eq. 19-20)."""
    s = _scorer().score(reference, prediction)["rougeL"]
    return {"f": s.fmeasure, "recall": s.recall, "precision": s.precision}
