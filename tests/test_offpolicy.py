"""The off-policy shaping f(p) = p / (p + gamma) and the per-token loss of injected rows (pure torch)."""

import math

import pytest
import torch

from karl_verl.offpolicy import offpolicy_token_losses, on_policy_advantages, row_flags, shaped_ratio


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_shaped_ratio_is_p_over_p_plus_gamma(gamma):
    p = torch.tensor([1e-6, 0.05, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    assert torch.allclose(shaped_ratio(p.log(), gamma), p / (p + gamma), rtol=1e-12, atol=0)


def test_shaping_gradient_in_log_p_is_p_gamma_over_p_plus_gamma_squared():
    gamma = 0.1
    p = torch.tensor([0.01, 0.1, 0.3, 0.9], dtype=torch.float64)
    log_p = p.log().requires_grad_()
    shaped_ratio(log_p, gamma).sum().backward()
    assert torch.allclose(log_p.grad, p * gamma / (p + gamma) ** 2, rtol=1e-12, atol=0)
    # At p = gamma the gradient is 1/4, its maximum; far above gamma it fades like gamma / p.
    assert log_p.grad[1].item() == pytest.approx(0.25)


def test_extreme_log_probs_do_not_overflow():
    out = shaped_ratio(torch.tensor([-1e4, 0.0, 80.0]), 0.1)
    assert torch.isfinite(out).all() and out[0] == 0 and out[1] == pytest.approx(1 / 1.1)


def test_token_losses_only_on_injected_rows():
    log_prob = torch.log(torch.tensor([[0.1, 0.9], [0.1, 0.9]]))
    advantages = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    losses = offpolicy_token_losses(log_prob, advantages, torch.tensor([0, 1]), 0.1)
    assert losses[0].tolist() == [0.0, 0.0]
    assert losses[1].tolist() == pytest.approx([-2 * 0.5, -2 * 0.9])
    assert on_policy_advantages(advantages, torch.tensor([True, False])).tolist() == [[0.0, 0.0], [2.0, 2.0]]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="gamma"):
        shaped_ratio(torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="expected 3 per-row flags"):
        row_flags(torch.tensor([1, 0]), 3)
    assert math.isclose(shaped_ratio(torch.tensor(0.0), 1.0).item(), 0.5)
