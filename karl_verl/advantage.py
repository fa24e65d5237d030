"""Mastery-weighted GRPO advantage (``karl_grpo``). Pure torch: no Ray, no verl.

Why weight after normalisation (docs/METHOD.md section 5): all samples of a GRPO group share one
entity and so one mastery level. Inside a group the reward scales s+/s- then mostly cancel under
mean/std normalisation: an all-success group is rescaled back, an all-failure group gets zero
advantage whatever s- is. Multiplying the normalised advantage by a per-level weight is the lever
that reward scaling cannot reach:

    A_i = (r_i - mean_g) / (std_g + eps)        (or r_i - mean_g without std normalisation)
    A_i <- A_i * alpha_plus[k_i]   if A_i > 0
    A_i <- A_i * alpha_minus[k_i]  if A_i < 0

Group statistics are computed per distinct group size on a [groups, size] view (no Python loop
over samples) and reproduce verl's ``compute_grpo_outcome_advantage`` bitwise, including
constant groups, whose float32 noise verl's own result carries: a group of one gets mean 0 and
std 1, std is the unbiased estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from karl_verl.config import AdvantageConfig
from karl_verl.mastery import parse_level


def _group_codes(index: Any) -> np.ndarray:
    """Group id 0..G-1 per sample, in order of first appearance (hash-based, any hashable ids)."""
    import pandas as pd

    codes, _ = pd.factorize(np.asarray(index, dtype=object), sort=False)
    return codes


# Group sizes for which torch's 1-D float32 sum of a group equals a left-to-right fold (checked
# bitwise by tests/test_advantage.py); GRPO's usual n=4 and n=8 take the vectorised path.
_FOLD_EXACT_SIZES = frozenset({2, 3, 4, 8})


def _fold_mean_std(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased std of ``block`` [groups, size], bitwise as torch's 1-D ops.

    torch computes a 1-D float32 mean as a float32 sum divided by n, and a 1-D std on CPU in
    float64 around that float32 mean (``std_var_all_cpu``), rounding the result to float32.
    """
    size = block.shape[1]
    total = block[:, 0].clone()
    for col in range(1, size):
        total = total + block[:, col]
    mean = total / size
    deviation = block.double() - mean.double().unsqueeze(1)
    squares = deviation[:, 0] * deviation[:, 0]
    for col in range(1, size):
        squares = squares + deviation[:, col] * deviation[:, col]
    std = torch.sqrt(squares / (size - 1)).to(block.dtype)
    return mean, std


def group_normalize(
    scores: torch.Tensor,
    index: Any,
    *,
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GRPO group normalisation of per-sample ``scores`` [batch] grouped by ``index`` [batch]."""
    batch = scores.shape[0]
    if len(index) != batch:
        raise ValueError(f"index: expected {batch} group ids (one per sample), got {len(index)}")
    if batch == 0:
        return scores.clone()
    codes = _group_codes(index)
    counts = np.bincount(codes)
    sample_sizes = counts[codes]
    # Samples of one group become contiguous, each group keeping its order of appearance, so each
    # reduction below sums the same values in the same order as verl's per-group torch.stack.
    order = np.argsort(codes, kind="stable")
    mean = torch.zeros_like(scores)
    std = torch.ones_like(scores)
    for size in np.unique(counts):
        size = int(size)
        if size == 1:
            continue
        rows = torch.from_numpy(order[sample_sizes[order] == size])
        block = scores[rows].view(-1, size)
        if size in _FOLD_EXACT_SIZES:
            group_mean, group_std = _fold_mean_std(block)
        else:
            # torch's 1-D float32 sum uses a blocked order we cannot fold; reduce each group's row
            # as verl does (one small reduction per group of this size).
            group_mean = torch.stack([row.mean() for row in block])
            group_std = torch.stack([row.std() for row in block])
        mean[rows] = group_mean.repeat_interleave(size)
        std[rows] = group_std.repeat_interleave(size)
    if norm_by_std:
        return (scores - mean) / (std + epsilon)
    return scores - mean


def group_normalize_over(
    scores: torch.Tensor,
    index: Any,
    stats_rows: Sequence[bool] | np.ndarray,
    *,
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GRPO group normalisation with each group's mean and std taken over its ``stats_rows`` only.

    Every sample is normalised by its group's statistics, also those outside ``stats_rows`` (the
    injected rollouts of ``karl.inject.on_policy_group_stats``: scored against the sampled ones).
    A group with one such row gets mean 0 and std 1 (as a group of one in :func:`group_normalize`);
    a group with none falls back to all of its rows.
    """
    batch = scores.shape[0]
    stats = np.asarray(stats_rows, dtype=bool)
    if len(index) != batch or stats.shape != (batch,):
        raise ValueError(f"index and stats_rows: expected {batch} values each, got {len(index)} and {stats.size}")
    if batch == 0:
        return scores.clone()
    codes = _group_codes(index)
    counted = np.bincount(codes, weights=stats, minlength=codes.max() + 1)
    stats = stats | (counted == 0)[codes]  # a group without any stats row uses all of its rows
    values = scores.double().numpy()
    counts = np.bincount(codes, weights=stats)
    means = np.bincount(codes, weights=values * stats) / counts
    squares = np.bincount(codes, weights=(values - means[codes]) ** 2 * stats)
    stds = np.sqrt(squares / np.maximum(counts - 1, 1))
    single = counts == 1
    means[single], stds[single] = 0.0, 1.0
    mean = torch.from_numpy(means[codes]).to(scores.dtype)
    std = torch.from_numpy(stds[codes]).to(scores.dtype)
    if norm_by_std:
        return (scores - mean) / (std + epsilon)
    return scores - mean


def levels_tensor(levels: Sequence[Any] | np.ndarray | torch.Tensor, default_level: int, batch: int) -> torch.Tensor:
    """Per-sample levels 1..5 as a long tensor; None entries take ``default_level``."""
    if isinstance(levels, torch.Tensor):
        out = levels.to(torch.long).flatten()
    elif isinstance(levels, np.ndarray) and levels.dtype.kind in "iu":
        out = torch.from_numpy(levels.astype(np.int64, copy=False)).flatten()
    else:
        out = torch.tensor(
            [default_level if level is None else parse_level(level, where=f"mastery_levels[{i}]")
             for i, level in enumerate(levels)],
            dtype=torch.long,
        )
    if out.numel() != batch:
        raise ValueError(f"mastery_levels: expected {batch} levels (one per sample), got {out.numel()}")
    if out.numel() and (out.min() < 1 or out.max() > 5):
        raise ValueError(f"mastery_levels: expected levels in 1..5, got values in [{int(out.min())}, {int(out.max())}]")
    return out


def weight_by_level(
    advantages: torch.Tensor, levels: torch.Tensor, config: AdvantageConfig
) -> torch.Tensor:
    """Multiply positive advantages by alpha_plus[level], negative ones by alpha_minus[level]."""
    alpha_plus = torch.tensor(config.alpha_plus, dtype=advantages.dtype, device=advantages.device)
    alpha_minus = torch.tensor(config.alpha_minus, dtype=advantages.dtype, device=advantages.device)
    idx = (levels.to(advantages.device) - 1).long()
    weight = torch.where(advantages > 0, alpha_plus[idx], alpha_minus[idx])
    return advantages * weight


def _config_value(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def compute_karl_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    mastery_levels: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    stats_rows: Sequence[bool] | np.ndarray | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantage, then per-level weighting; verl advantage-estimator signature.

    Args:
        token_level_rewards: [batch, response_len] rewards; a sample's score is the row sum.
        response_mask: [batch, response_len] 1 on response tokens.
        index: [batch] group ids (verl's ``uid``); samples of one prompt share an id.
        epsilon: added to the group std.
        norm_adv_by_std_in_grpo: divide by the group std; None reads
            ``config.norm_adv_by_std_in_grpo`` (verl does not pass it to custom estimators),
            default True.
        config: ``config.algorithm``; its ``karl`` key holds :class:`AdvantageConfig` fields.
        mastery_levels: [batch] levels 1..5 or level names (the ``karl`` trainer supplies them);
            None: no weighting, the result equals verl's GRPO.
        stats_rows: [batch] bools: the rows each group's mean and std come from
            (:func:`group_normalize_over`); None or all True: every row, as verl's GRPO.
        **kwargs: other keywords verl may pass (e.g. ``reward_baselines``) are ignored.

    Returns:
        (advantages, returns), both [batch, response_len], equal.
    """
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_config_value(config, "norm_adv_by_std_in_grpo", True))
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        if stats_rows is None or bool(np.all(stats_rows)):
            advantages = group_normalize(scores, index, epsilon=epsilon, norm_by_std=norm_adv_by_std_in_grpo)
        else:
            advantages = group_normalize_over(scores, index, stats_rows, epsilon=epsilon,
                                              norm_by_std=norm_adv_by_std_in_grpo)
        if mastery_levels is not None:
            adv_config = AdvantageConfig.from_mapping(_config_value(config, "karl", None))
            if not adv_config.is_identity:
                levels = levels_tensor(mastery_levels, parse_level(adv_config.default_level), scores.shape[0])
                advantages = weight_by_level(advantages, levels, adv_config)
        advantages = advantages.unsqueeze(-1) * response_mask
    return advantages, advantages

