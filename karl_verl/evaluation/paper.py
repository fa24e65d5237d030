"""KVG-Bench facts from the paper: the seen/unseen category split and Table 1 (KARL_METHOD.md section 6).

The one place these numbers live. Accuracies are Acc@0.5 in percent, as printed in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: Categories of the training data (in the paper's Table 1 column order).
SEEN_CATEGORIES: tuple[str, ...] = ("aircraft", "car", "reptilia", "bird", "food")
#: Categories never seen in training (in the paper's Table 1 column order).
UNSEEN_CATEGORIES: tuple[str, ...] = ("dog", "mollusca", "mammal", "flower", "landmark")

#: Short column headers of Table 1.
CATEGORY_LABELS: Mapping[str, str] = MappingProxyType({
    "aircraft": "Air", "car": "Car", "reptilia": "Rep", "bird": "Bird", "food": "Food",
    "dog": "Dog", "mollusca": "Mol", "mammal": "Mam", "flower": "Flwr", "landmark": "Ldmk",
})

#: Aggregate columns; each paper row may give any of them and any category.
SEEN_KEY, UNSEEN_KEY, OVERALL_KEY = "seen", "unseen", "overall"

#: Paper Table 1 rows: model -> column -> Acc@0.5 (%); columns the paper does not report are absent.
PAPER_TABLE1: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "Qwen3-VL-8B": MappingProxyType({SEEN_KEY: 56.94, UNSEEN_KEY: 57.54, OVERALL_KEY: 57.19}),
    "Qwen3-VL-32B": MappingProxyType({SEEN_KEY: 63.38, UNSEEN_KEY: 66.18, OVERALL_KEY: 64.52}),
    "UniVG-R1": MappingProxyType({SEEN_KEY: 55.30, UNSEEN_KEY: 58.46, OVERALL_KEY: 56.59}),
    "Visual-RFT": MappingProxyType({SEEN_KEY: 34.72, UNSEEN_KEY: 38.24, OVERALL_KEY: 36.15}),
    "GRPO": MappingProxyType({SEEN_KEY: 67.29, UNSEEN_KEY: 66.36, OVERALL_KEY: 66.92}),
    "KARL": MappingProxyType({
        "aircraft": 71.05, "car": 83.65, "reptilia": 70.34, "bird": 45.02, "food": 87.86,
        SEEN_KEY: 67.30,
        "dog": 85.60, "mollusca": 50.37, "mammal": 69.64, "flower": 80.90, "landmark": 67.47,
        UNSEEN_KEY: 70.04, OVERALL_KEY: 68.41,
    }),
    "Human (closed-book)": MappingProxyType({OVERALL_KEY: 56.41}),
    "Human (with search)": MappingProxyType({OVERALL_KEY: 78.83}),
})

#: Rows printed beside ours by default.
DEFAULT_PAPER_ROWS: tuple[str, ...] = ("Qwen3-VL-8B", "KARL")

#: Inference settings of the released evaluator (temperature, new-token budget, seed).
BENCH_TEMPERATURE = 0.5
BENCH_MAX_NEW_TOKENS = 4096
BENCH_SEED = 20
