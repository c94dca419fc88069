"""Each loss term equals its equation (the paper's, or a baseline's paper's) on small hand-computed tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from mllm_unlearn.methods.losses import (
    calibration_output_change,
    cvf_loss,
    cvf_pull,
    cvf_push,
    fisher_mask,
    ga_loss,
    kl_divergence,
    manu_scores,
    nmse_push,
    npo_loss,
    pool,
    retention_mse,
    simnpo_loss,
    top_k_rows,
    total_loss,
)
from mllm_unlearn.models.scoring import sequence_logprob


def test_pool_is_mean_over_tokens():  # Eq. 2
    h = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    assert torch.equal(pool(h), torch.tensor([[2.0, 4.0]]))


def test_cvf_push_matches_eq4_by_hand():
    z_u = torch.tensor([[1.0, 0.0]])
    z_r = torch.tensor([[2.0, 0.0]])  # cos 1 with z_u after normalisation
    queue = torch.tensor([[0.0, 3.0], [-1.0, 0.0]])  # cos 0 and -1
    tau = 0.5
    pos, n1, n2 = math.exp(1 / tau), math.exp(0 / tau), math.exp(-1 / tau)
    expected = -math.log((n1 + n2) / (pos + n1 + n2))
    assert cvf_push(z_u, z_r, queue, tau).item() == pytest.approx(expected, rel=1e-6)


def test_cvf_push_falls_as_the_unlearned_ivr_leaves_its_reference():
    z_r = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0]])
    near = cvf_push(torch.tensor([[1.0, 0.1]]), z_r, queue, 0.1)
    far = cvf_push(torch.tensor([[0.1, 1.0]]), z_r, queue, 0.1)
    assert far < near
    with pytest.raises(ValueError, match="queue"):
        cvf_push(z_r, z_r, queue[:0], 0.1)


def test_cvf_push_floor_takes_each_terms_log_and_keeps_pushing_a_token_already_near_the_negatives():
    """``floor`` f (``push_floor``): the mean over IVRs of log(Eq. 4's term + f), by hand on two IVRs; on an IVR
    that already resembles a negative, its gradient is the plain term's divided by (term + f), so larger."""
    z_r = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    z_u = torch.tensor([[1.0, 0.2], [0.6, 0.8]])  # the second sits on a negative: its term is small
    tau, f = 0.5, 0.1
    terms = [cvf_push(z_u[i : i + 1], z_r[i : i + 1], queue, tau).item() for i in range(2)]
    expected = sum(math.log(t + f) for t in terms) / 2
    assert cvf_push(z_u, z_r, queue, tau, floor=f).item() == pytest.approx(expected, rel=1e-6)
    assert terms[1] < terms[0]
    grads = []
    for floor in (0.0, f):
        u = z_u[1:].clone().requires_grad_(True)
        cvf_push(u, z_r[1:], queue, tau, floor=floor).backward()
        grads.append(u.grad.norm().item())
    assert grads[1] == pytest.approx(grads[0] / (terms[1] + f), rel=1e-5)
    assert grads[1] > 2 * grads[0]


def test_nmse_push_is_negative_squared_distance():  # Eq. 5
    assert nmse_push(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).item() == pytest.approx(-5.0)


def test_cvf_pull_is_one_minus_cosine_to_the_anchor():  # Eq. 6
    z_u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    anchor = torch.tensor([1.0, 1.0])
    expected = 1 - (1 / math.sqrt(2) + 1 / math.sqrt(2)) / 2
    assert cvf_pull(z_u, anchor).item() == pytest.approx(expected, rel=1e-6)


def test_cvf_loss_and_total_weights():  # Eq. 7 and Eq. 11
    assert cvf_loss(torch.tensor(2.0), torch.tensor(3.0), 0.5).item() == 4.0
    assert total_loss(torch.tensor(4.0), torch.tensor(1.0), torch.tensor(0.25), 2.0, 3.0).item() == 11.25


def test_retention_mse_averages_squared_token_distances():  # Eq. 9
    h_u = torch.zeros(1, 2, 2)
    h_r = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])  # squared distances 2 and 4 -> (1/N)||.||_F^2 = 3
    assert retention_mse(h_u, h_r).item() == pytest.approx(3.0)


def test_calibration_output_change_is_the_relative_mean_square_output_change_on_the_tokens():  # AlphaEdit
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    a, b = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))[0].T, torch.randn(4, 3, generator=g)
    c = x.T @ x / len(x)  # Eq. 13
    dw = 0.5 * b.double() @ a  # Eq. 16 with LoRA scaling 0.5
    by_tokens = ((x @ dw.T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    gram, output = (a @ c @ a.T).float(), float(((w @ c) * w).sum())
    assert calibration_output_change(b, gram, output, 0.5).item() == pytest.approx(by_tokens.item(), rel=1e-5)
    assert calibration_output_change(b * 0, gram, output, 0.5).item() == 0


# -- the baselines' losses (each docstring cites its paper) ------------------------------------
def test_ga_is_negative_nll():
    assert ga_loss(torch.tensor(2.5)).item() == -2.5


def test_npo_at_the_reference_is_2_log2_over_beta_and_falls_as_logp_falls():
    logp = torch.tensor([-3.0, -7.0])
    for beta in (0.1, 0.4):
        assert npo_loss(logp, logp.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    by_hand = -(2 / 0.1) * F.logsigmoid(torch.tensor([-0.1 * -2.0, -0.1 * 1.0])).mean()
    assert npo_loss(torch.tensor([-5.0, -6.0]), logp, 0.1).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert npo_loss(logp - 10, logp, 0.1) < npo_loss(logp, logp, 0.1)  # forgetting lowers the loss


def test_simnpo_uses_length_normalised_nll():
    nll_sum, lengths = torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0])  # per-token NLL 1 and 2
    expected = -(2 / 4.5) * (math.log(1 / (1 + math.exp(-4.5))) + math.log(1 / (1 + math.exp(-9.0)))) / 2
    assert simnpo_loss(nll_sum, lengths, 4.5, 0.0).item() == pytest.approx(expected, rel=1e-6)
    delta = -(2 / 4.5) * (math.log(0.5) + math.log(1 / (1 + math.exp(-4.5)))) / 2
    assert simnpo_loss(nll_sum, lengths, 4.5, 1.0).item() == pytest.approx(delta, rel=1e-6)


def test_kl_direction_and_vocabulary_mask():
    p, q = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    kl_pq = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    kl_qp = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(kl_pq, rel=1e-5)
    assert kl_divergence(q.log(), p.log()).item() == pytest.approx(kl_qp, rel=1e-5)
    # batchmean over positions = PyTorch's kl_div(log q, p)
    lp, lq = torch.randn(5, 7), torch.randn(5, 7)
    torch_kl = F.kl_div(F.log_softmax(lq, -1), F.softmax(lp, -1), reduction="batchmean")
    assert kl_divergence(lp, lq).item() == pytest.approx(torch_kl.item(), rel=1e-5)
    # vocabulary mask: the masked column is dropped and both rows renormalised
    p3, q3 = torch.tensor([[0.45, 0.05, 0.5]]), torch.tensor([[0.25, 0.25, 0.5]])
    keep = torch.tensor([True, True, False])
    assert kl_divergence(p3.log(), q3.log(), keep).item() == pytest.approx(kl_pq, rel=1e-5)
    assert kl_divergence(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


def test_sequence_logprob_sums_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]))
    targets, rows = torch.tensor([0, 1, 0]), torch.tensor([0, 0, 2])
    logp, lengths = sequence_logprob(logits, targets, rows, 3)
    assert torch.allclose(logp, torch.tensor([math.log(0.5 * 0.75), 0.0, math.log(0.9)]))
    assert lengths.tolist() == [2, 0, 1]


def test_fisher_mask_and_manu_scores_and_top_k():
    f_f, f_p = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 0.0, 3.0])
    assert fisher_mask(f_f, f_p).tolist() == [True, False, False, True]
    assert fisher_mask(f_f, f_p, 2.0).tolist() == [True, False, False, False]
    stats_f = {
        "mean_abs": torch.tensor([2.0, 1.0]),
        "std": torch.tensor([1.0, 1.0]),
        "rms": torch.tensor([4.0, 1.0]),
        "freq": torch.tensor([1.0, 0.0]),
    }
    stats_r = {k: torch.ones(2) for k in stats_f}
    w = {"mean_abs": 2.0, "std": 2.0, "rms": 2.0, "freq": 0.0}
    expected = 2 * (2 / (1 + 1e-5) - 1) + 2 * (1 / (1 + 1e-5) - 1) + 2 * (4 / (1 + 1e-5) - 1)
    assert manu_scores(stats_f, stats_r, w)[0].item() == pytest.approx(expected, rel=1e-6)
    rows = top_k_rows({"a": torch.tensor([0.1, 5.0, 0.2]), "b": torch.tensor([3.0, 0.0, 4.0, 0.3])}, 0.4)
    assert {k: v.tolist() for k, v in rows.items()} == {"a": [1], "b": [0, 2]}  # ceil(0.4 * 7) = 3
