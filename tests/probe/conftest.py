"""Tiny probe sets written with Pillow (no downloads), handed to tests through the ``probe_kit`` fixture."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ENTITIES = {
    "aircraft": ["Airbus A320", "Boeing 747", "Cessna 172", "Sukhoi Su-30"],
    "car": ["Audi A4", "BMW M3", "Fiat 500", "Tesla Model 3", "Volvo XC90"],
}


def png_bytes(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def probe_rows(entities: dict[str, list[str]] = ENTITIES, images_per_entity: int = 2) -> list[dict]:
    rows, seed = [], 0
    for category, names in entities.items():
        for name in names:
            for k in range(images_per_entity):
                seed += 1
                rows.append({"entity": name, "category": category, "image": {"bytes": png_bytes(seed), "path": None},
                             "image_id": f"{category}-{seed}-{k}"})
    return rows


def write_probe_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_probe_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


class ProbeKit:
    """The helpers above, reachable from tests without importing this conftest."""

    entities = ENTITIES
    png_bytes = staticmethod(png_bytes)
    rows = staticmethod(probe_rows)
    write_parquet = staticmethod(write_probe_parquet)
    write_jsonl = staticmethod(write_probe_jsonl)


@pytest.fixture()
def probe_kit() -> ProbeKit:
    return ProbeKit()


@pytest.fixture()
def probe_parquet(tmp_path) -> Path:
    return write_probe_parquet(tmp_path / "probe.parquet", probe_rows())
