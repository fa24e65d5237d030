"""Reference responses for knowledge injection in the tests' training runs."""

import json
from pathlib import Path


def write_references(grounding: Path, path: Path) -> Path:
    """One reference response per prompt of the ``grounding`` parquet: the correct box in the answer
    format, with a rationale the model was not warmed up on (it fits the CPU recipe's 48 response tokens)."""
    import pyarrow.parquet as pq

    with path.open("w", encoding="utf-8") as handle:
        for row in pq.read_table(grounding).to_pylist():
            box = row["reward_model"]["ground_truth"].split("<|box_start|>")[-1].split("<|box_end|>")[0]
            response = f"<think>It is the {row['extra_info']['entity']}.</think><answer>{box}</answer>"
            handle.write(json.dumps({"key": row["extra_info"]["index"], "response": response}) + "\n")
    return path
