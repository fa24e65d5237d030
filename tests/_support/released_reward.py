"""An independent, literal transcription of the released KARL reward's behaviour (test oracle).

Written straight from the released reward's rules (docs/METHOD.md section 3) with plain ``re`` calls (including the
quadratic form-1 regex), deliberately sharing no code with karl_verl, so that tests can compare
karl_verl's linear-time reader and reward against it on generated adversarial text.
"""

import re

NUM = r"-?\d+(?:\.\d+)?"
FORMS = (
    rf"\(({NUM}),.*?({NUM})\),\(({NUM}),({NUM})\)",
    rf"\[({NUM}), ({NUM}), ({NUM}), ({NUM})\]",
    rf"\(({NUM}), ({NUM}), ({NUM}), ({NUM})\)",
    rf"\(({NUM}), ({NUM})\)\n?.*?\(({NUM}), ({NUM})\)",
)
LEVELS = ["completely correct", "mostly correct", "partially correct", "mostly incorrect", "completely incorrect"]
POS = [0.65, 0.85, 1.0, 1.2, 1.4]
NEG = [-0.6, -0.5, -0.4, -0.2, 0.0]


def extract_bbox(text):
    for form in FORMS:
        found = re.findall(form, text)
        if found:
            box = [float(v) for v in found[-1]]
            if sum(box) < 4:
                box = [v * 1000 for v in box]
            return box
    return [0, 0, 0, 0]


def iou(a, b):
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union == 0:
        return None
    return inter / union


def reward(response, ground_truth, level_name="completely incorrect"):
    k = LEVELS.index(level_name)
    fmt = 0.5 if re.match(r"<think>.*?</think>\s*<answer>.*?</answer>", response, re.DOTALL) else 0.0
    answer = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL)
    if answer and re.search(FORMS[0], answer.group(1)):
        fmt += 0.5
    if answer is None or re.search(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", ground_truth) is None:
        return fmt
    value = iou(extract_bbox(answer.group(1)), extract_bbox(ground_truth))
    if value is not None and value > 0.65:
        return min(POS[k] * value, 1.0) + fmt
    return NEG[k] + fmt
