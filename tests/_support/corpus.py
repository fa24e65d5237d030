"""Seeded generator of adversarial model responses for the reward and box-reader tests."""

import random

_NUMBERS = ["0", "1", "12", "999", "1000", "-5", "0.5", "0.25", "3.75", "-0.1", "007", "1.", ".5", "1e3",
            "9" * 400, "٣", "1.2.3", "2,5"]
_FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "(", ")", "[", "]", ",", ", ", "),(", "\n", " ", "x",
    "The box is ", "{\"bbox_2d\": [", "]}", "```json\n", "```", "<|box_start|>", "<|box_end|>", "é", "🚀",
    "<think>reasoning</think>", "<answer></answer>", "\t", "NaN", "inf",
]


def random_number(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(_NUMBERS)
    return str(round(rng.uniform(-50, 1100), rng.choice([0, 0, 1, 2])))


def random_box(rng: random.Random) -> str:
    a, b, c, d = (random_number(rng) for _ in range(4))
    forms = [
        f"({a},{b}),({c},{d})", f"({a}, {b}),({c},{d})", f"[{a}, {b}, {c}, {d}]", f"({a}, {b}, {c}, {d})",
        f"({a}, {b})\n({c}, {d})", f"({a}, {b}) to ({c}, {d})", f"[{a},{b},{c},{d}]",
        f'{{"bbox_2d": [{a}, {b}, {c}, {d}], "label": "x"}}', f"({a},{b}), ({c},{d})", f"({a},x{b}),({c},{d})",
    ]
    return rng.choice(forms)


def random_response(rng: random.Random) -> str:
    parts = []
    style = rng.random()
    if style < 0.45:
        gap = rng.choice(["", " ", "\n"])
        parts = ["<think>", "because", "</think>", gap, "<answer>", random_box(rng), "</answer>"]
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts) + 1), random_box(rng))
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(_FRAGMENTS))
    else:
        for _ in range(rng.randint(0, 14)):
            parts.append(random_box(rng) if rng.random() < 0.35 else rng.choice(_FRAGMENTS + _NUMBERS))
    return "".join(parts)


def random_ground_truth(rng: random.Random) -> str:
    box = rng.choice([
        "(100,200),(300,400)", "(0,0),(1000,1000)", "(0.1,0.2),(0.3,0.4)", "(5,5),(5,5)", "(10,10),(0,0)",
        f"({rng.randint(0, 900)},{rng.randint(0, 900)}),({rng.randint(100, 1000)},{rng.randint(100, 1000)})",
    ])
    entity = rng.choice(
        ["<|object_ref_start|>Sukhoi Su-30<|object_ref_end|>", "<|object_ref_start|><|object_ref_end|>", ""]
    )
    return f"{entity}<|box_start|>{box}<|box_end|>"


def matching_pair(rng: random.Random) -> tuple[str, str]:
    """A response whose box overlaps the ground truth's, so success branches are exercised."""
    x1, y1 = rng.randint(0, 500), rng.randint(0, 500)
    x2, y2 = x1 + rng.randint(1, 400), y1 + rng.randint(1, 400)
    jitter = [rng.randint(-30, 30) for _ in range(4)]
    px1, py1, px2, py2 = x1 + jitter[0], y1 + jitter[1], x2 + jitter[2], y2 + jitter[3]
    response = rng.choice([
        f"<think>t</think><answer>({px1},{py1}),({px2},{py2})</answer>",
        f"<think>t</think>\n<answer>[{px1}, {py1}, {px2}, {py2}]</answer> trailing",
        f"<answer>({px1}, {py1}) and ({px2}, {py2})</answer>",
    ])
    return response, f"<|object_ref_start|>E<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
