"""Each loss term equals its equation in the paper on small hand-computed tensors."""

import math

import pytest
import torch

from mllm_unlearn.methods.losses import cvf_loss, cvf_pull, cvf_push, nmse_push, pool, retention_mse, total_loss


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
