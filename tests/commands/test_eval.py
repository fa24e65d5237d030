"""``karl-verl eval`` argument handling: the paper's rows only beside the paper's category split."""

import argparse

from karl_verl.commands.eval import _paper_rows
from karl_verl.evaluation.paper import DEFAULT_PAPER_ROWS, SEEN_CATEGORIES, UNSEEN_CATEGORIES


def namespace(seen=SEEN_CATEGORIES, unseen=UNSEEN_CATEGORIES, rows=",".join(DEFAULT_PAPER_ROWS)):
    return argparse.Namespace(seen=tuple(seen), unseen=tuple(unseen), paper_rows=rows)


def test_paper_split_shows_the_paper_rows(capsys):
    assert _paper_rows(namespace()) == list(DEFAULT_PAPER_ROWS)
    assert _paper_rows(namespace(seen=reversed(SEEN_CATEGORIES))) == list(DEFAULT_PAPER_ROWS)  # order is no split
    assert capsys.readouterr().err == ""


def test_another_split_leaves_them_out_and_says_why(capsys):
    assert _paper_rows(namespace(seen=("aircraft", "car"), unseen=("dog",))) == []
    assert "the paper's rows are left out: --seen/--unseen are not the paper's split" in capsys.readouterr().err
    assert _paper_rows(namespace(unseen=UNSEEN_CATEGORIES[:-1])) == []


def test_no_rows_asked_no_note(capsys):
    assert _paper_rows(namespace(seen=("aircraft",), rows="")) == []
    assert capsys.readouterr().err == ""
