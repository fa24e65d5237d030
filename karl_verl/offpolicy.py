"""The policy loss of injected (off-policy) tokens. Pure torch: no Ray, no verl.

An injected rollout was written by someone else (a reference file, a teacher), not sampled from the
policy, so the usual importance ratio ``pi_theta / pi_old`` has no behaviour probability to divide
by. As LUFFY does, the behaviour probability is taken as 1 and the ratio is the policy's own token
probability ``p = exp(log_prob)`` passed through a shaping function, without clipping:

    f(p) = p / (p + gamma)            token loss: -A * f(p)
    d f / d log p = p * gamma / (p + gamma) ** 2

The shaping keeps the gradient of low-probability tokens (p << gamma: about p / gamma, like the
ratio itself) from vanishing and damps the tokens the policy already predicts (p >> gamma:
gradient about gamma / p), which is why it behaves better than an added SFT term (whose gradient
in log p is 1 for every token). Sampled (on-policy) tokens keep verl's clipped PPO ratio.

The loss of a mixed batch is ONE aggregation (verl's ``loss_agg_mode``) over a per-token loss
matrix whose injected rows hold ``-A * f(p)`` and whose sampled rows hold the clipped PPO term.
Every aggregation mode is linear in the loss matrix for a fixed mask, so the batch's loss is the
clipped term over the matrix with injected rows' advantages set to 0 (their PPO term is then
exactly 0) plus the shaped term over the matrix with sampled rows set to 0, both aggregated with
the full response mask: :func:`on_policy_advantages` and :func:`offpolicy_token_losses`.
"""

from __future__ import annotations

import math

import torch


def shaped_ratio(log_prob: torch.Tensor, gamma: float) -> torch.Tensor:
    """``f(p) = p / (p + gamma)`` for ``p = exp(log_prob)``, computed as ``sigmoid(log_prob - log gamma)``.

    The sigmoid form never overflows, and its derivative in ``log_prob`` is ``f (1 - f)``, which
    equals ``p * gamma / (p + gamma) ** 2``.
    """
    if not gamma > 0:
        raise ValueError(f"gamma: expected a number > 0, got {gamma!r}")
    return torch.sigmoid(log_prob - math.log(gamma))


def row_flags(injected: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row injected flags (any numeric or bool tensor of ``batch`` values) as a bool column [batch, 1]."""
    flags = injected.reshape(-1)
    if flags.numel() != batch:
        raise ValueError(f"injected: expected {batch} per-row flags, got {flags.numel()}")
    return (flags != 0).reshape(batch, 1)


def offpolicy_token_losses(log_prob: torch.Tensor, advantages: torch.Tensor, injected: torch.Tensor,
                           gamma: float) -> torch.Tensor:
    """Per-token loss ``-A * f(p)`` on injected rows, 0 on sampled rows; [batch, response_len]."""
    rows = row_flags(injected, log_prob.shape[0]).to(log_prob.device)
    losses = -advantages * shaped_ratio(log_prob, gamma)
    return torch.where(rows, losses, torch.zeros_like(losses))


def on_policy_advantages(advantages: torch.Tensor, injected: torch.Tensor) -> torch.Tensor:
    """Advantages with injected rows set to 0, so that the clipped PPO term is exactly 0 there."""
    rows = row_flags(injected, advantages.shape[0]).to(advantages.device)
    return torch.where(rows, torch.zeros_like(advantages), advantages)
