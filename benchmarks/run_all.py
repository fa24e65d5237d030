"""Run every benchmark and print one table: each figure, its target and whether this run met it.

    python benchmarks/run_all.py                    # about 27 minutes on a 2-core CPU machine
    python benchmarks/run_all.py --quick            # about 10 minutes: smaller probe sets, shorter main_ppo runs
    python benchmarks/run_all.py --readme docs/BENCHMARKS.md # also write the table into docs/BENCHMARKS.md

Every figure is a ratio or a time measured side by side in this run (the machine is noisy): the
advantage estimator against verl's GRPO, the reward manager against verl's naive one, the probe's
logprob mode against generate mode, the probe at growing probe-set sizes, KVG-Bench scoring and run
comparison, verl's real ``main_ppo`` on CPU with the karl trainer against verl's sync trainer, and
its step with iVGR off against karl-verl before iVGR (and with iVGR on).
The table in docs/BENCHMARKS.md is written from this one (``--readme``), and a test checks that its
rows are this file's :data:`ROWS`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

#: The generated table (docs/BENCHMARKS.md) sits between these two lines.
README_START = "<!-- benchmarks table: written by `python benchmarks/run_all.py --readme docs/BENCHMARKS.md` -->"
README_END = "<!-- end of benchmarks table -->"


@dataclass(frozen=True)
class Row:
    label: str
    #: Key of the figure in the benchmarks' merged results.
    key: str
    #: How the figure is printed: "x" ratio, "s", "ms", "GiB", "%", "min".
    unit: str
    target: str = ""
    met: Callable[[float], bool] | None = None

    def format(self, value: float) -> str:
        if self.unit == "%":
            return f"{value:.0%}"
        if self.unit == "x":
            return f"{value:.3g}x"
        return f"{value:.3g} {self.unit}".rstrip()


ROWS: tuple[Row, ...] = (
    Row("karl_grpo speed-up over verl GRPO, 16,384 x 256, random rewards", "advantage_speedup_random", "x",
        ">= 5x", lambda v: v >= 5),
    Row("karl_grpo speed-up, KARL outcome rewards", "advantage_speedup_karl", "x", ">= 5x", lambda v: v >= 5),
    Row("karl_grpo speed-up, KARL rewards + level weights", "advantage_speedup_karl_weighted", "x"),
    Row("karl_grpo max abs difference from verl GRPO", "advantage_max_diff_random", "", "<= 1e-6",
        lambda v: v <= 1e-6),
    Row("karl / naive reward manager time, 4,096 samples", "reward_manager_karl_over_naive", "x", "<= 1.3x",
        lambda v: v <= 1.3),
    Row("worst 100 KB adversarial response", "reward_ms_per_100kb_worst", "ms", "bounded"),
    Row("probe generate / logprob time, 64-token cap (the probe's default)", "probe_speedup_64", "x", ">= 5x",
        lambda v: v >= 5),
    Row("probe generate / logprob time, 16-token cap", "probe_speedup_16", "x"),
    Row("probe at scale: peak memory, 10x the questions", "probe_peak_rss_ratio", "x", "<= 1.2x",
        lambda v: v <= 1.2),
    Row("probe at scale: bytes returned, top-20 request / choice mode", "probe_choice_bytes_vs_top20", "x"),
    Row("probe at scale: one refresh at 100,000 questions (tiny model, CPU)", "probe_refresh_min_paper_scale",
        "min"),
    Row("probe prompts, 8B image processor: trainer time of a later refresh / the first (prompts cached)",
        "probe_prompt_build_later_over_first", "x"),
    Row("probe prompt cache at 100,000 questions (karl.mastery.probe_prompt_cache_mib: 256)",
        "probe_prompt_cache_mib_paper_scale", "MiB", "<= 256 MiB", lambda v: v <= 256),
    Row("KVG-Bench scoring, 1,336 cases, slower protocol", "eval_score_s", "s", "< 1 s", lambda v: v < 1),
    Row("eval --compare, 1,336 cases x 10,000 resamples", "eval_compare_s", "s", "< 5 s", lambda v: v < 5),
    Row("main_ppo step time, karl trainer (no refresh) / verl sync + grpo", "karl_over_sync", "x", "<= 1.05x",
        lambda v: v <= 1.05),
    Row("main_ppo step time, karl + curriculum + inject agent loop (off) / karl", "features_over_karl", "x",
        "<= 1.05x", lambda v: v <= 1.05),
    Row("main_ppo step with iVGR off: (step + the calls iVGR added, timed) / step", "ivgr_off_overhead", "x",
        "<= 1.02x", lambda v: v <= 1.02),
    Row("main_ppo step time, iVGR off / karl-verl before iVGR, end to end (run-to-run noise)",
        "ivgr_off_over_before", "x"),
    Row("main_ppo step time, iVGR on / off (two streams: 2x the rollouts)", "ivgr_on_over_off", "x"),
    Row("main_ppo: judge share of an iVGR step (local rule judge)", "ivgr_judge_share", "%"),
    Row("main_ppo: probe share of training time, probe at begin + 1 refresh", "probe_share", "%"),
    Row("main_ppo: peak memory of a run, summed over its processes", "peak_memory_gib", "GiB", "< 8 GiB",
        lambda v: v < 8),
)


def measure(quick: bool) -> dict[str, float]:
    """Every benchmark, in turn; their figures merged."""
    import bench_advantage
    import bench_cpu_main_ppo
    import bench_eval
    import bench_ivgr_cost
    import bench_probe
    import bench_probe_scale
    import bench_reward

    figures: dict[str, float] = {}
    print("== karl_grpo vs verl GRPO ==")
    figures.update(bench_advantage.main())
    print("\n== reward ==")
    figures.update(bench_reward.main())
    print("\n== probe: logprob vs generate ==")
    figures.update({f"probe_{key}": value for key, value in bench_probe.main([]).items()
                    if isinstance(value, (int, float))})
    print("\n== KVG-Bench scoring and comparison ==")
    figures.update(bench_eval.main())
    figures["eval_score_s"] = max(figures["eval_score_s_karl"], figures["eval_score_s_released"])
    print("\n== probe at scale ==")
    figures.update(bench_probe_scale.measure(["--sizes", *(["200", "2000"] if quick else ["1000", "10000"])]))
    print("\n== main_ppo on CPU: karl trainer vs verl's sync trainer ==")
    figures.update(bench_cpu_main_ppo.measure(["--repeats", "1" if quick else "2", "--steps", "3" if quick else "4"]))
    print("\n== main_ppo on CPU: iVGR off vs before iVGR, and on ==")
    figures.update(bench_ivgr_cost.measure(["--repeats", "1" if quick else "2", "--steps", "3" if quick else "5"]))
    return figures


def table(figures: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, target, met) per row; rows whose figure is missing say so."""
    rows = []
    for row in ROWS:
        if row.key not in figures:
            rows.append((row.label, "not measured", row.target, ""))
            continue
        value = figures[row.key]
        met = "" if row.met is None else ("yes" if row.met(value) else "NO")
        rows.append((row.label, row.format(value), row.target, met))
    return rows


def markdown(rows: list[tuple[str, str, str, str]], note: str) -> str:
    lines = [README_START, "", "| benchmark | figure | target | met |", "|---|---|---|---|"]
    lines += [f"| {label} | {figure} | {target} | {met} |" for label, figure, target, met in rows]
    return "\n".join([*lines, "", note, README_END])


def write_readme(path: Path, text: str) -> None:
    """Replace the table between the markers of ``path`` (written to a temporary file, then renamed)."""
    from karl_verl.atomic import atomic_write_text

    readme = path.read_text(encoding="utf-8")
    if README_START not in readme or README_END not in readme:
        raise SystemExit(f"{path}: no benchmarks table markers (expected the lines {README_START!r} and "
                         f"{README_END!r})")
    before, rest = readme.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    atomic_write_text(path, before + text + after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller probe sets, one shorter main_ppo run each")
    parser.add_argument("--readme", type=Path, default=None, help="write the table into this README's markers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    figures = measure(args.quick)
    rows = table(figures)
    width = max(len(label) for label, *_ in rows)
    print(f"\n{'benchmark':<{width}}  {'figure':>12}  {'target':<9}met")
    for label, figure, target, met in rows:
        print(f"{label:<{width}}  {figure:>12}  {target:<9}{met}")
    elapsed = time.perf_counter() - started
    print(f"(all measured in this run{' with --quick' if args.quick else ''}; {elapsed:.0f} s)")
    if args.readme is not None:
        import os

        note = (f"Measured by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` in {elapsed / 60:.0f} "
                f"min on a {os.cpu_count()}-core CPU machine.")
        write_readme(args.readme, markdown(rows, note))
        print(f"table written into {args.readme}")
    return 0 if all(met != "NO" for *_, met in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
