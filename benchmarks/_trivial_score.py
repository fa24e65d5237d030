"""The trivial score function the naive-manager baseline uses in bench_reward.py."""


def trivial(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return 0.0
