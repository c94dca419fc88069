"""Scoring one reply: letter parsing, cloze matching, ROUGE-L."""

import pytest

from mllm_unlearn.evaluate.metrics import cloze_correct, parse_choice, rouge_l


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("c.", "C"),
        ("D\n", "D"),
        ("(a)", "A"),
        ("[C]", "C"),
        ("Answer: B", "B"),
        ("answer: d", "D"),
        ("The answer is C.", "C"),
        ("option A", "A"),
        ("  C) Oslo", "C"),
        ("B. baker", "B"),
    ],
)
def test_parse_choice_reads_the_letter(reply, letter):
    assert parse_choice(reply) == letter


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "   ",
        "no letter here",
        "Bob Lind",
        "a baker",
        "E",
        "Answer: E",
        "42",
        "the answer",
    ],
)
def test_parse_choice_without_a_valid_letter_is_none(reply):
    assert parse_choice(reply) is None


def test_parse_choice_respects_the_option_set():
    assert parse_choice("E", letters="ABCDE") == "E"
    assert parse_choice("D", letters="ABC") is None


def test_cloze_is_case_and_space_insensitive_containment():
    assert cloze_correct("She lives in  New   York now", "new york")
    assert not cloze_correct("She lives in York", "New York")
    assert not cloze_correct("anything", "")


def test_rouge_l_against_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat sat") = 3 tokens: recall 3/6, precision 3/3
    s = rouge_l("the cat sat", "the cat sat on the mat")
    assert s["recall"] == pytest.approx(0.5)
    assert s["precision"] == pytest.approx(1.0)
    assert s["f"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    # LCS is a subsequence, not a substring: "a b c d" vs "a x b y d" -> "a b d"
    s = rouge_l("a x b y d", "a b c d")
    assert s["recall"] == pytest.approx(3 / 4) and s["precision"] == pytest.approx(3 / 5)


def test_rouge_l_uses_the_stemmer_and_ignores_case():
    assert rouge_l("Bakers Baking", "baker bakes")["f"] == pytest.approx(1.0)
    assert rouge_l("", "anything")["f"] == 0.0
