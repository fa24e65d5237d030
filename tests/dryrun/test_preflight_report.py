"""The pre-flight report: row problems of one kind grouped on one line, each row once."""

from karl_verl.dryrun.preflight import PreflightReport


def test_rows_of_one_kind_share_a_line_with_a_count_and_the_first_five():
    report = PreflightReport()
    report.add("data.val_files", "file not found: /v.parquet")
    for row in range(1, 9):
        report.add_row("/t.parquet", row, "ground truth has no readable box", f"'gt{row}'")
    report.add_row("/t.parquet", 4, "prompt too long", "90 tokens")
    report.add_row("/o.parquet", 2, "ground truth has no readable box", "'x'")
    assert report.problem_lines() == [
        "data.val_files: file not found: /v.parquet",
        "/t.parquet: ground truth has no readable box: 8 rows: row 1 ('gt1'), row 2 ('gt2'), row 3 ('gt3'), "
        "row 4 ('gt4'), row 5 ('gt5'), and 3 more",
        "/t.parquet row 4: prompt too long: 90 tokens",
        "/o.parquet row 2: ground truth has no readable box: 'x'",
    ]
    text = report.format()
    assert "11 problem(s):" in text and text.count("ground truth has no readable box") == 2


def test_each_row_once():
    report = PreflightReport()
    for _ in range(2):  # e.g. the same file given as training and validation data
        report.add_row("/t.parquet", 3, "ground truth has no readable box", "'gt'")
        report.add("karl.reward.tau", "expected a number")
    assert [str(p) for p in report.problems] == ["/t.parquet row 3: ground truth has no readable box: 'gt'",
                                                "karl.reward.tau: expected a number"]
