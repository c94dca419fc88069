"""Question bodies for each task, shared by the data that trains a model and the harness that tests it.

These are the *bodies* only; each architecture wraps them in its own chat template
(``mllm_unlearn.models``), which adds the image placeholder when the item has an image.
The MCQ body is MLLMU-Bench's evaluation prompt, letter for letter.
"""

from __future__ import annotations

from collections.abc import Mapping

MCQ_INSTRUCTION = "Just give ONE letter representing the answer directly."
CLOZE_INSTRUCTION = "Fill in the blank (__) with the missing words only."


def format_mcq(question: str, options: Mapping[str, str]) -> str:
    """MLLMU-Bench's MCQ body: the question, one ``X: option`` line per option, the instruction."""
    lines = [question.strip()]
    lines += [f"{letter}: {text}" for letter, text in sorted(options.items())]
    lines.append(MCQ_INSTRUCTION)
    return "\n".join(lines)


def format_cloze(sentence: str) -> str:
    """A cloze item: the sentence with its ``__`` blank, then the instruction."""
    return f"{sentence.strip()}\n{CLOZE_INSTRUCTION}"
