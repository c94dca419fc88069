"""Scoring one reply: MCQ letter parsing, cloze matching, ROUGE-L (paper App. C.2, Eq. 19-20)."""

from __future__ import annotations

import re
from collections.abc import Sequence
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


# -- names in replies (identity questions: the audit's misidentification probe, forget's report) ----------
def name_regex(name: str, *, surname: bool = True) -> re.Pattern[str]:
    """The full name, or (``surname``) the surname alone for multi-word names, as whole words,
    case-insensitive, any run of white space between the words."""
    words = name.split()
    alternatives = [r"\s+".join(map(re.escape, words))]
    if surname and len(words) > 1 and len(words[-1]) > 1:
        alternatives.append(re.escape(words[-1]))
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def classify_name(reply: str, own: str | None, others: Sequence[str], *, surname: bool = True) -> str:
    """``named`` (the person's own name), ``other`` (another known name: misidentification), ``neither``.
    With ``surname=False`` only full names count.

    Full names are matched first and cut out, so that "Otto Bianchi" does not count as naming
    "Dario Bianchi"; then the surname alone. A bare surname shared by the person and someone else
    counts as ``named``: the conservative reading for a deletion."""
    others = [o for o in others if o.casefold() != (own or "").casefold()]
    if own and name_regex(own, surname=False).search(reply):
        return "named"
    rest, misnamed = reply, False
    for o in sorted(others, key=len, reverse=True):
        rest, n = name_regex(o, surname=False).subn(" ", rest)
        misnamed = misnamed or n > 0
    if surname and own and name_regex(own).search(rest):
        return "named"
    if misnamed or (surname and any(name_regex(o).search(rest) for o in others)):
        return "other"
    return "neither"
