"""The actor loss with injected rows against numbers computed by hand (verl's ppo_loss for the rest)."""

import math

import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig
from verl.workers.utils.losses import ppo_loss

from karl_verl.integration.inject_loss import INJECTED_FIELD, karl_inject_ppo_loss

# Three rows (prompt length, response token probabilities under the current policy, old
# probabilities, advantage, injected):
#   row 0 sampled:  p = (0.8, 0.5), old = (0.5, 0.5), A = +1  -> ratios 1.6 (clipped to 1.2) and 1.0
#   row 1 injected: p = (0.1, 0.9), old = (0.01, 0.01), A = +2 -> f(p) = 0.1/0.2 = 0.5 and 0.9/1.0 = 0.9;
#                   as a sampled row its ratios (10, 90) would be clipped, as an injected one they are not
#   row 2 sampled:  p = (0.25,),   old = (0.5,),     A = -1  -> ratio 0.5, clipped up to 0.8
PROMPT_LENS = (2, 1, 2)
PROBS = ((0.8, 0.5), (0.1, 0.9), (0.25,))
OLD = ((0.5, 0.5), (0.01, 0.01), (0.5,))
ADVANTAGES = (1.0, 2.0, -1.0)
# Per-token losses by hand: row 0: max(-1.6, -1.2) = -1.2 and -1.0; row 1: -2 * 0.5 = -1.0 and
# -2 * 0.9 = -1.8; row 2: max(0.5, 0.8) = 0.8 (dual clip min(3, 0.8) keeps it).
TOKEN_LOSSES = ((-1.2, -1.0), (-1.0, -1.8), (0.8,))


def _nested(rows, dtype=torch.float32):
    return torch.nested.as_nested_tensor([torch.tensor(r, dtype=dtype) for r in rows], layout=torch.jagged)


def _batch(injected, loss_agg_mode="token-mean"):
    config = FSDPActorConfig(strategy="fsdp2", ppo_mini_batch_size=3, ppo_micro_batch_size_per_gpu=3,
                             use_dynamic_bsz=False, rollout_n=1, loss_agg_mode=loss_agg_mode, clip_ratio=0.2)
    # The model's log-probs over each whole sequence; response token j sits at prompt_len - 1 + j.
    sequences = []
    for prompt_len, probs in zip(PROMPT_LENS, PROBS, strict=True):
        seq = [0.0] * (prompt_len + len(probs))
        for j, p in enumerate(probs):
            seq[prompt_len - 1 + j] = math.log(p)
        sequences.append(seq)
    flat = torch.tensor([v for seq in sequences for v in seq], requires_grad=True)
    offsets = torch.tensor([0, *torch.tensor([len(s) for s in sequences]).cumsum(0).tolist()])
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(flat, offsets=offsets)}
    data = tu.get_tensordict({
        "prompts": _nested([[1] * n for n in PROMPT_LENS], torch.int64),
        "responses": _nested([[2] * len(p) for p in PROBS], torch.int64),
        "response_mask": _nested([[1] * len(p) for p in PROBS], torch.int64),
        "old_log_probs": _nested([[math.log(o) for o in row] for row in OLD]),
        "advantages": _nested([[a] * len(p) for a, p in zip(ADVANTAGES, PROBS, strict=True)]),
        INJECTED_FIELD: torch.tensor(injected),
    }, non_tensor_dict={"dp_size": 1, "batch_num_tokens": 5, "global_batch_size": 3})
    return config, model_output, data, flat


def _token_grads(flat):
    """d loss / d log p of each response token, in row order."""
    out, start = [], 0
    for prompt_len, probs in zip(PROMPT_LENS, PROBS, strict=True):
        out.append([flat.grad[start + prompt_len - 1 + j].item() for j in range(len(probs))])
        start += prompt_len + len(probs)
    return out


def test_mixed_batch_loss_is_the_hand_computed_value():
    config, model_output, data, flat = _batch([0, 1, 0])
    loss, metrics = karl_inject_ppo_loss(config, model_output, data, shaping_gamma=0.1)
    # token-mean over the 5 tokens of the batch: (-1.2 - 1.0 - 1.0 - 1.8 + 0.8) / 5
    assert loss.item() == pytest.approx(-4.2 / 5, abs=1e-6)
    assert metrics["actor/karl_offpolicy_loss"].aggregate() == pytest.approx(-2.8 / 5, abs=1e-6)
    assert metrics["actor/pg_loss"].aggregate() == pytest.approx(-1.4 / 5, abs=1e-6)
    assert metrics["actor/karl_offpolicy_ratio_sum"].aggregate() == pytest.approx(0.5 + 0.9, abs=1e-6)
    assert metrics["actor/karl_offpolicy_tokens"].aggregate() == 2
    loss.backward()
    grads = _token_grads(flat)
    # Sampled: the clipped token has no gradient, the unclipped one -A * ratio / 5 = -0.2;
    # row 2 (A < 0, clipped from below): none.
    assert grads[0] == pytest.approx([0.0, -0.2], abs=1e-6)
    assert grads[2] == pytest.approx([0.0], abs=1e-6)
    # Injected: -A * p * gamma / (p + gamma)^2 / 5, though their ratio to the old policy is 10 and 90.
    assert grads[1] == pytest.approx([-2 * 0.1 * 0.1 / 0.2 ** 2 / 5, -2 * 0.9 * 0.1 / 1.0 ** 2 / 5], abs=1e-6)


def test_seq_mean_token_mean_aggregates_the_same_matrix():
    config, model_output, data, _ = _batch([0, 1, 0], loss_agg_mode="seq-mean-token-mean")
    loss, _ = karl_inject_ppo_loss(config, model_output, data, shaping_gamma=0.1)
    rows = [sum(r) / len(r) for r in TOKEN_LOSSES]
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-6)


def test_the_same_rows_all_sampled_are_verls_ppo_loss_with_clipping_everywhere():
    config, model_output, data, _ = _batch([0, 0, 0])
    ours, _ = karl_inject_ppo_loss(config, model_output, data, shaping_gamma=0.1)
    config2, model_output2, data2, _ = _batch([0, 0, 0])
    verl_loss, _ = ppo_loss(config2, model_output2, data2)
    assert torch.equal(ours, verl_loss)
    # Row 1 sampled: both ratios (10, 90) clip to 1.2: -2 * 1.2 per token.
    assert ours.item() == pytest.approx((-1.2 - 1.0 - 2.4 - 2.4 + 0.8) / 5, abs=1e-6)


def test_a_batch_without_the_field_is_verls_ppo_loss():
    config, model_output, data, _ = _batch([0, 0, 0])
    del data[INJECTED_FIELD]
    config2, model_output2, data2, _ = _batch([0, 0, 0])
    assert torch.equal(karl_inject_ppo_loss(config, model_output, data, shaping_gamma=0.1)[0],
                       ppo_loss(config2, model_output2, data2)[0])


def test_every_micro_batch_reports_the_same_keys_and_ranks_aggregate_to_the_injected_token_mean():
    """verl all-gathers each key's per-micro-batch values from every rank; Metric.aggregate_dp refuses
    ranks with different counts. Rank 0 has micro-batches [mixed, sampled only], rank 1 [sampled only,
    sampled only]: every key must aggregate, and the ratio must be the mean over injected tokens."""
    from verl.utils.metric import Metric, reduce_metrics

    from karl_verl.integration.inject_loss import fold_offpolicy_ratio

    def micro_batch(injected):
        config, model_output, data, _ = _batch(injected)
        return karl_inject_ppo_loss(config, model_output, data, shaping_gamma=0.1)[1]

    ranks = [[micro_batch([0, 1, 0]), micro_batch([0, 0, 0])], [micro_batch([0, 0, 0]), micro_batch([0, 0, 0])]]
    keys = {frozenset(m) for rank in ranks for m in rank}
    assert len(keys) == 1
    gathered = {}
    for key in next(iter(keys)):
        per_rank = []
        for rank in ranks:
            metric = rank[0][key].init_list()
            for m in rank:
                metric.extend(m[key])
            per_rank.append(metric)
        gathered[key] = Metric.aggregate_dp(per_rank)
    reduced = reduce_metrics(gathered)
    fold_offpolicy_ratio(reduced)
    assert reduced["actor/karl_offpolicy_ratio_mean"] == pytest.approx((0.5 + 0.9) / 2, abs=1e-6)
    assert reduced["actor/karl_offpolicy_tokens"] == pytest.approx(2 / 2)  # 2 injected tokens, mean over 2 ranks
    assert "actor/karl_offpolicy_ratio_sum" not in reduced
    # A step without injected tokens reports no ratio at all (not a 0 that reads as "every p near 0").
    empty = {"actor/karl_offpolicy_ratio_sum": 0.0, "actor/karl_offpolicy_tokens": 0.0, "actor/pg_loss": 0.5}
    fold_offpolicy_ratio(empty)
    assert empty == {"actor/karl_offpolicy_tokens": 0.0, "actor/pg_loss": 0.5}
    # A run without injection: the step's metrics stay as they are.
    plain = {"actor/pg_loss": 0.5, "actor/kl_loss": 0.1}
    fold_offpolicy_ratio(plain)
    assert plain == {"actor/pg_loss": 0.5, "actor/kl_loss": 0.1}
