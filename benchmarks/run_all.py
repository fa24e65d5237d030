"""Run every benchmark and print one table of ratios, all measured side by side in this run.

    python benchmarks/run_all.py            # about 30-40 s on a 2-core CPU machine

Targets: karl_grpo >= 5x verl's GRPO (16,384 x 256); karl reward manager <= 1.3x verl's naive
(4,096 samples); probe logprob >= 5x generate; a 100 KB response scored in milliseconds;
KVG-Bench's 1,336 cases scored well under 1 s under either protocol, and two runs compared
(10,000 paired bootstrap resamples) well under 5 s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_advantage  # noqa: E402
import bench_eval  # noqa: E402
import bench_probe  # noqa: E402
import bench_reward  # noqa: E402


def main() -> dict[str, float]:
    started = time.perf_counter()
    figures: dict[str, float] = {}
    print("== karl_grpo vs verl GRPO ==")
    figures.update(bench_advantage.main())
    print("\n== reward ==")
    figures.update(bench_reward.main())
    print("\n== probe: logprob vs generate ==")
    probe = bench_probe.main([])
    print("\n== KVG-Bench scoring and comparison ==")
    figures.update(bench_eval.main())
    scoring = max(figures["eval_score_s_karl"], figures["eval_score_s_released"])
    rows = [
        ("karl_grpo speed-up over verl GRPO, 16,384 x 256, random rewards", figures["advantage_speedup_random"],
         ">= 5x", figures["advantage_speedup_random"] >= 5),
        ("karl_grpo speed-up, KARL outcome rewards", figures["advantage_speedup_karl"], ">= 5x",
         figures["advantage_speedup_karl"] >= 5),
        ("karl_grpo speed-up, KARL rewards + level weights", figures["advantage_speedup_karl_weighted"], "",
         None),
        ("karl_grpo max |difference| from verl GRPO", figures["advantage_max_diff_random"], "<= 1e-6",
         figures["advantage_max_diff_random"] <= 1e-6),
        ("karl / naive reward manager time, 4,096 samples", figures["reward_manager_karl_over_naive"], "<= 1.3x",
         figures["reward_manager_karl_over_naive"] <= 1.3),
        ("worst 100 KB response, ms", figures["reward_ms_per_100kb_worst"], "bounded", None),
        (f"probe generate / logprob time ({probe['max_new_tokens'][0]} new tokens)", probe["speedup"], ">= 5x",
         probe["meets_target"]),
    ]
    for cap in probe["max_new_tokens"][1:]:
        rows.append((f"probe generate / logprob time ({cap} new tokens)", probe[f"speedup_{cap}"], "", None))
    rows += [
        ("KVG-Bench scoring, 1,336 cases, slower protocol, s", scoring, "< 1 s", scoring < 1),
        ("eval --compare, 1,336 cases x 10,000 resamples, s", figures["eval_compare_s"], "< 5 s",
         figures["eval_compare_s"] < 5),
    ]
    print(f"\n{'benchmark':<66}{'figure':>10}  {'target':<9}{'met':<4}")
    for name, value, target, met in rows:
        mark = "" if met is None else ("yes" if met else "NO")
        print(f"{name:<66}{value:>10.3g}  {target:<9}{mark:<4}")
    print(f"(all measured in this run; {time.perf_counter() - started:.0f} s)")
    figures.update({f"probe_{k}": v for k, v in probe.items() if isinstance(v, (int, float))})
    return figures


if __name__ == "__main__":
    main()
