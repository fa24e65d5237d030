"""An independent reading of the released KVG-Bench evaluator's rules (test oracle).

Written from the rule list (the benchmark section of the method notes), sharing no code with
karl_verl: the answer span and the json fence are found by plain string search rather than by
regular expressions, the IoU is computed with torch tensors in float32 (the original's own
arithmetic) rather than numpy, and the knowledge split is counted with plain dictionaries. Only
the nine box patterns are regular expressions, because their text is the rule.
"""

import re

import torch

PATTERNS = [
    r"<answer>.*?\((\d*?),.*?(\d*?)\),\((\d*?),(\d*?)\)</answer>",
    r"So the answer is.*?\((\d*?),.*?(\d*?)\),\((\d*?),(\d*?)\)",
    r"\((\d*?),.*?(\d*?)\),\((\d*?),(\d*?)\)",
    r"\((.*?),.*?(.*?)\).*?\((.*?),.*?(.*?)\)",
    r"\[(\d*?), (\d*?), (\d*?), (\d*?)\]",
    r"\[(.*?), (.*?), (.*?), (.*?)\]",
    r"\((\d*?), (\d*?), (\d*?), (\d*?)\)",
    r"\((\d*?), (\d*?)\)\n?.*?\((\d*?), (\d*?)\)",
    r"\[\[(\d*?),(\d*?),(\d*?),(\d*?)\]\]",
]
HIGH = ["completely correct", "mostly correct", "partially correct"]
LOW = ["mostly incorrect", "completely incorrect"]


def answer_span(response):
    """First <answer>...</answer> with no line break inside (shortest), stripped; else the response."""
    start = 0
    while True:
        i = response.find("<answer>", start)
        if i < 0:
            return response
        j = response.find("</answer>", i + len("<answer>"))
        newline = response.find("\n", i + len("<answer>"))
        if j >= 0 and (newline < 0 or j < newline):
            return response[i + len("<answer>"):j].strip()
        start = i + 1


def json_fence(text):
    if "```json" not in text:
        return text
    i = text.index("```json") + len("```json")
    j = text.find("```", i)
    return text if j < 0 else text[i:j]


def box(text):
    for number, pattern in enumerate(PATTERNS, start=1):
        last = None
        for match in re.finditer(pattern, text):
            last = match.groups()
        if last is None:
            continue
        try:
            values = [float(last[0].replace("[", "").replace("x", ""))] + [float(v) for v in last[1:]]
        except Exception:
            values = [0, 0, 0, 0]
        if values[0] + values[1] + values[2] + values[3] < 4:
            values = [v * 1000 for v in values]
        return values, number
    return [0.0, 0.0, 0.0, 0.0], 0


def iou(pred, target):
    a = torch.tensor(pred, dtype=torch.float32).view(-1, 4)
    b = torch.tensor(target, dtype=torch.float32).view(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return (inter / (area_a[:, None] + area_b - inter)).item()


def ground_truth(answer):
    found = re.search(r"<\|box_start\|>\(([0-9]*?),([0-9]*?)\),\(([0-9]*?),([0-9]*?)\)<\|box_end\|>", answer)
    return [float(found[1]), float(found[2]), float(found[3]), float(found[4])]


def score(response, gt_answer):
    """(max_iou, correct, box, pattern) of one case."""
    pred, number = box(json_fence(answer_span(response)))
    max_iou = 0
    for target in [ground_truth(gt_answer)]:
        value = iou(pred, target)
        if value > max_iou:
            max_iou = value
    return max_iou, max_iou >= 0.5, pred, number


def aggregate(cases, seen):
    """cases: list of (category, max_iou, correct). Per category, seen, unseen, all: (num, acc, mean IoU)."""
    groups = {}
    for category, value, correct in cases:
        for name in (category, "seen" if category in seen else "unseen", "all"):
            groups.setdefault(name, []).append((value, correct))
    return {name: (len(items), sum(c for _, c in items) / len(items), sum(v for v, _ in items) / len(items))
            for name, items in groups.items()}


def knowledge_split(cases, seen, train_entities, train_table, seen_other_table, unseen_table):
    """cases: list of (category, entity, correct). High/low (correct, num) over seen, unseen and all."""
    counts = {}
    for category, entity, correct in cases:
        if category in seen:
            domain, table = ("seen", "train") if entity in train_entities else ("seen", "trainood")
            level = (train_table if table == "train" else seen_other_table)[entity]
        else:
            domain, table, level = "unseen", "testood", unseen_table[entity]
        num, right = counts.get((domain, table, level), (0, 0))
        counts[(domain, table, level)] = (num + 1, right + int(correct))
    out = {}
    for domain in ("seen", "unseen"):
        for band, names in (("high", HIGH), ("low", LOW)):
            num = right = 0
            for (d, _table, level), (n, c) in counts.items():
                if d == domain and level in names:
                    num += n
                    right += int(n * (c / n))
            out[(domain, band)] = (right, num)
    for band in ("high", "low"):
        out[("all", band)] = (out[("seen", band)][0] + out[("unseen", band)][0],
                              out[("seen", band)][1] + out[("unseen", band)][1])
    return out
