"""Probe 6a — forget quality against the retrained oracle (TOFU / CLEAR's ``ks_test``).

Protocol: the oracle is the vanilla fine-tune repeated on the training data without the forget
people (:mod:`.oracle`). On the forget items — every image-asked MCQ of every forget person, on the
canonical photo and on each unseen photo — each model gets a per-item **truth ratio**: the mean
per-token probability of the three wrong options over that of the right one (TOFU's truth ratio,
Maini et al. 2024, with the MCQ's wrong options standing in for the perturbed answers and its right
option for the paraphrased one). ``forget_quality`` is the p-value of a two-sample Kolmogorov-Smirnov
test (``scipy.stats.ks_2samp``) between the unlearned model's and the oracle's truth ratios: high
(say > 0.05) = indistinguishable from never having seen the people. The same test on the per-token
probability of the right answer is reported as ``ks_answer_prob_p``.

Items of one person share a face, so they are not independent and the p-value is optimistic about
differences; it is a comparison between runs on one world, not a significance test.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import ks_2samp

from ...models.loading import LoadedModel
from .common import AuditData, MCQScores, score_mcqs


def forget_items_scores(lm: LoadedModel, data: AuditData) -> MCQScores:
    forget = data.forget_people
    return score_mcqs(lm, data.image_mcqs("forget", forget) + data.unseen_mcqs(forget))


def forget_quality(run: MCQScores, oracle: MCQScores) -> dict[str, float]:
    if [s.id for s in run.samples] != [s.id for s in oracle.samples]:
        raise ValueError("the run and the oracle were scored on different items")
    tr_run, tr_oracle = run.truth_ratio(), oracle.truth_ratio()
    ks_tr = ks_2samp(tr_run, tr_oracle)
    ks_p = ks_2samp(run.answer_prob(), oracle.answer_prob())
    return {
        "forget_quality": float(ks_tr.pvalue),
        "ks_truth_ratio_stat": float(ks_tr.statistic),
        "ks_answer_prob_p": float(ks_p.pvalue),
        "truth_ratio_median": float(np.median(tr_run)),
        "truth_ratio_median_oracle": float(np.median(tr_oracle)),
        "n_items": len(tr_run),
    }
