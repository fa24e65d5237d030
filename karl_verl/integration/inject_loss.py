"""The actor's loss with injected rollouts: verl's ``ppo_loss`` for sampled tokens, the shaped term for injected ones.

Runs in the actor workers. verl's ``ppo_loss`` passes its registered policy losses no per-row
field, so the ``karl`` trainer hands the workers this whole loss instead
(``actor_rollout_wg.set_loss_fn``, only when ``karl.inject.enable``). Each micro-batch it gets
carries every TransferQueue field of its rows, among them ``karl_injected`` (1 on a row whose
response was injected, 0 on a sampled one; written by the ``karl_inject_agent`` agent loop).

How the two parts combine (see :mod:`karl_verl.offpolicy`): verl's ``ppo_loss`` runs unchanged on
the micro-batch with the injected rows' advantages set to 0: their clipped PPO term is exactly 0,
while the aggregation (``loss_agg_mode``, the global token and sequence counts verl puts on the
micro-batch), the entropy term and the KL term still see every row. The shaped term ``-A * f(p)``
of the injected rows is aggregated the same way and added. A micro-batch without injected rows
is verl's ``ppo_loss`` bitwise.

Every micro-batch reports the same metric keys, injected rows or not: verl all-gathers each key's
per-micro-batch values from every rank and ``Metric.aggregate_dp`` refuses ranks with different
counts (and a key only some ranks report would be averaged over those alone). The shaped ratio is
reported as a sum and a token count (SUM over micro-batches, averaged over ranks alike); the
``karl`` trainer turns them into ``actor/karl_offpolicy_ratio_mean``
(:func:`fold_offpolicy_ratio`).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from karl_verl.offpolicy import offpolicy_token_losses, on_policy_advantages, row_flags, shaped_ratio

#: The per-row field (int 0/1) saying that a row's response was injected, not sampled.
INJECTED_FIELD = "karl_injected"

OFFPOLICY_LOSS = "actor/karl_offpolicy_loss"
RATIO_SUM, RATIO_TOKENS, RATIO_MEAN = ("actor/karl_offpolicy_ratio_sum", "actor/karl_offpolicy_tokens",
                                       "actor/karl_offpolicy_ratio_mean")


def fold_offpolicy_ratio(metrics: dict[str, Any]) -> None:
    """Replace, in the reduced actor ``metrics``, the ratio sum by the mean over injected tokens.

    The mean is left out of a step without injected tokens (there is nothing to average).
    """
    if RATIO_SUM not in metrics:
        return
    total = float(metrics.pop(RATIO_SUM))
    tokens = float(metrics.get(RATIO_TOKENS, 0.0))
    if tokens > 0:
        metrics[RATIO_MEAN] = total / tokens


def _offpolicy_metrics(loss: torch.Tensor | float, ratio_sum: torch.Tensor | float, tokens: torch.Tensor | float,
                       aggregation: Any) -> dict[str, Metric]:
    return {OFFPOLICY_LOSS: Metric(value=loss, aggregation=aggregation),
            RATIO_SUM: Metric(value=ratio_sum, aggregation=AggregationType.SUM),
            RATIO_TOKENS: Metric(value=tokens, aggregation=AggregationType.SUM)}


def _zero_injected_advantages(advantages: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``advantages`` (nested per response, or padded) with the rows flagged in ``rows`` set to 0."""
    if not advantages.is_nested:
        return on_policy_advantages(advantages, rows)
    lengths = advantages.offsets().diff()
    token_rows = torch.repeat_interleave(rows.to(lengths.device), lengths)
    values = advantages.values()
    values = torch.where(token_rows, torch.zeros_like(values), values)
    return torch.nested.as_nested_tensor(list(values.split(lengths.tolist())), layout=torch.jagged)


def injected_rows(data: TensorDict) -> torch.Tensor | None:
    """The micro-batch's per-row injected flags (bool [batch]), or None when it has no injected row."""
    if INJECTED_FIELD not in data.keys():
        return None
    flags = data[INJECTED_FIELD]
    if not isinstance(flags, torch.Tensor):
        flags = torch.as_tensor([int(v) for v in flags.tolist()])
    rows = row_flags(flags, len(data)).reshape(-1)
    return rows if bool(rows.any()) else None


def karl_inject_ppo_loss(config: Any, model_output: Any, data: TensorDict, dp_group: Any = None, *,
                         shaping_gamma: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``ppo_loss`` signature (bind ``config`` and ``shaping_gamma`` with ``functools.partial``)."""
    rows = injected_rows(data)
    if rows is None:
        loss, metrics = ppo_loss(config, model_output, data, dp_group)
        aggregation = metrics["actor/pg_loss"].aggregation if "actor/pg_loss" in metrics else AggregationType.MEAN
        metrics.update(_offpolicy_metrics(0.0, 0.0, 0.0, aggregation))
        return loss, metrics

    sampled = data.copy()  # a shallow copy: only the advantages are replaced
    sampled["advantages"] = _zero_injected_advantages(data["advantages"], rows)
    loss, metrics = ppo_loss(config, model_output, sampled, dp_group)

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    padded = data.select("response_mask", "advantages").to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    token_losses = offpolicy_token_losses(log_prob, padded["advantages"], rows, shaping_gamma)
    # The same aggregation (and global batch counts, set on config by ppo_loss) as the clipped term.
    offpolicy_loss = agg_loss(loss_mat=token_losses, loss_mask=response_mask, loss_agg_mode=config.loss_agg_mode,
                              **config.global_batch_info)

    injected_mask = response_mask & rows.reshape(-1, 1).to(response_mask.device)
    with torch.no_grad():
        ratio_sum = (shaped_ratio(log_prob, shaping_gamma) * injected_mask).sum()
    aggregation = metrics["actor/pg_loss"].aggregation if "actor/pg_loss" in metrics else AggregationType.MEAN
    metrics.update(_offpolicy_metrics(offpolicy_loss.detach(), ratio_sum, injected_mask.sum().float(), aggregation))
    return loss + offpolicy_loss, metrics
