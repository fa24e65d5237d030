"""Reading a chosen letter, accuracies and the mastery table (pure, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karl_verl.config import MasteryConfig
from karl_verl.mastery import DEFAULT_THRESHOLDS, level_from_accuracy
from karl_verl.probe.questions import ProbeQuestion
from karl_verl.probe.scoring import (
    build_mastery_table,
    is_correct,
    letter_probabilities,
    parse_choice,
    per_entity_accuracy,
    per_entity_mean,
)

OPTIONS = ["Airbus A320", "Boeing 747", "Sukhoi Su-30", "Boeing 747-400"]

# reply                                         expected   why
CASES = [
    ("B", "B"),                                 # bare letter
    ("B.", "B"),
    ("(B)", "B"),
    ("[d]", "D"),                               # bracketed, lower case: still only a letter
    ("**C**", "C"),                             # markdown bold
    ("c", "C"),
    ("Answer: B", "B"),
    ("answer: (c)", "C"),
    ("The answer is B. Su-30", "B"),            # explicit statement wins over the option text
    ("The correct option is D", "D"),
    ("B. Boeing 747", "B"),
    ("(A) Airbus A320", "A"),
    ("I think it's D.", "D"),
    ("It is B", "B"),                           # a capital letter standing alone
    ("<think>maybe A.</think>C", "C"),          # only what follows the reasoning counts
    ("<think>x</think><answer>(D)</answer>", "D"),
    ("Boeing 747", "B"),                        # option text, exactly one option
    ("It is a Boeing 747-400.", "D"),           # the longest of nested names
    ("A Boeing 747", "B"),                      # "A" here is an article, not option A
    ("Sukhoi Su-30.", "C"),
    ("Answer: Sukhoi Su-30", "C"),
    ("A or B", None),                           # ambiguous
    ("Between A and B", None),
    ("The answer is B. No, the answer is C.", None),
    ("A. B. C. D.", None),
    ("airbus a320 or boeing 747", None),
    ("C-130", None),                            # a name, not a letter
    ("The answer is: A-10", None),
    ("E", None),
    ("", None),
    ("   \n", None),
    ("I do not know.", None),
]


@pytest.mark.parametrize(("reply", "expected"), CASES)
def test_parse_choice(reply, expected):
    assert parse_choice(reply, OPTIONS) == expected


def test_parse_choice_without_options_and_non_strings():
    assert parse_choice("Boeing 747") is None
    assert parse_choice("B") == "B"
    for value in (None, 3, b"B", ["B"]):
        assert parse_choice(value, OPTIONS) is None


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.text(max_size=12), max_size=5))
def test_parse_choice_never_raises(text, options):
    assert parse_choice(text, options) in (None, "A", "B", "C", "D")


def _question(entity: str, answer: str = "A", index: int = 0) -> ProbeQuestion:
    return ProbeQuestion(f"{entity}-{index}", entity, "c", b"", "", ("w", "x", "y", "z"), answer)


def test_per_entity_accuracy_counts_unparseable_as_wrong():
    questions = [_question("e1", "A", 0), _question("e1", "B", 1), _question("e1", "C", 2), _question("e2", "D", 0)]
    accuracy, counts = per_entity_accuracy(questions, ["A", None, "C", "A"])
    assert accuracy == {"e1": pytest.approx(2 / 3), "e2": 0.0} and counts == {"e1": 3, "e2": 1}
    assert not is_correct(questions[1], None)
    with pytest.raises(ValueError, match="4 questions but 3 choices"):
        per_entity_accuracy(questions, ["A", "B", "C"])
    assert per_entity_mean(questions, [1.0, 0.5, 0.0, 0.25]) == {"e1": 0.5, "e2": 0.25}


def test_letter_probabilities_softmax_over_the_letters():
    probabilities = letter_probabilities(np.array([[-1.0, -1.0, -np.inf, -np.inf], [-900.0, -901.0, -902.0, -903.0]]))
    np.testing.assert_allclose(probabilities[0], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert np.all(np.diff(probabilities[1]) < 0)


def test_mastery_table_uses_the_mastery_thresholds():
    accuracy = {"a": 0.7, "b": 0.69, "c": 0.3, "d": 0.0}
    table = build_mastery_table(accuracy, {e: 10 for e in accuracy}, epoch=2, meta={"mode": "logprob"})
    assert {e: table.level_of(e) for e in accuracy} == {e: level_from_accuracy(v) for e, v in accuracy.items()}
    assert table.get("a").num_questions == 10 and table.get("a").epoch == 2 and table.meta == {"mode": "logprob"}
    custom = MasteryConfig(thresholds=(0.9, 0.6, 0.3, 0.1)).thresholds
    assert build_mastery_table(accuracy, {e: 1 for e in accuracy}, thresholds=custom).level_of("a") == 2
    assert DEFAULT_THRESHOLDS == MasteryConfig().thresholds
