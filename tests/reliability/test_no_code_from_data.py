"""No code from data (issue 6.6): tables, configs and datasets are read as data only.

Mastery tables and trainer states are JSON, configs YAML (through OmegaConf's safe loader),
datasets parquet or JSONL: nothing is unpickled or evaluated. Each test hands a loader a file
crafted to run code (create a marker file) if it were unpickled, YAML-constructed, instantiated
or evaluated, and checks that the loader refuses it or reads it as inert data, and that the
marker never appears. A static check keeps code-running loaders out of the package source.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reliability_kit import record

import karl_verl
from karl_verl.config import ConfigError, KarlConfig
from karl_verl.data.annotations import ReadOptions, iter_records
from karl_verl.data.convert import convert_annotations
from karl_verl.data.schema import DataError
from karl_verl.evaluation.bench import load_bench, load_predictions
from karl_verl.mastery import MasteryError, MasteryTable
from karl_verl.mastery_state import MasteryState
from karl_verl.probe.questions import ProbeError, load_probe_set
from karl_verl.reward import compute_score

PACKAGE = Path(karl_verl.__file__).parent


class _RunsCode:
    """Unpickling this calls ``exec`` on its source: the marker file appears if anything unpickles."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


def _payload(marker: Path, protocol: int) -> bytes:
    return pickle.dumps(_RunsCode(f"open({str(marker)!r}, 'w').write('ran')"), protocol=protocol)


@pytest.fixture()
def marker(tmp_path) -> Path:
    path = tmp_path / "CODE_RAN"
    yield path
    assert not path.exists(), "a crafted data file ran code"
    record("crafted_files")


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_crafted_payloads_do_run_code_when_loaded_unsafely(tmp_path):
    """The other tests mean something only if their payloads really run code when misread."""
    import yaml

    marker = tmp_path / "CODE_RAN"
    for protocol in (0, pickle.HIGHEST_PROTOCOL):
        pickle.loads(_payload(marker, protocol))
        assert marker.exists()
        marker.unlink()
    yaml.unsafe_load(_yaml_payload(marker))
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# The package source


# Calls that turn data into code. A method such as ``model.eval()`` is not ``eval``: only bare
# names and module attributes are matched.
FORBIDDEN_CALLS = {
    "eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load",
    "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "marshal.load",
    "marshal.loads", "shelve.open", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
    "yaml.unsafe_load_all", "torch.load", "joblib.load", "pd.read_pickle", "pandas.read_pickle",
    "jsonpickle.decode", "hydra.utils.instantiate", "instantiate",
}
#: ``numpy.load`` unpickles object arrays unless ``allow_pickle`` is left False.
NUMPY_LOADS = {"np.load", "numpy.load"}
#: Dynamic imports whose module name is not a literal, allowed only where it comes from a constant
#: table in the code (cli's subcommands, the registration list, the verl surface table).
IMPORT_MODULE_ALLOWED = {"cli.py", "integration/__init__.py", "integration/verl_surface.py"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def test_package_source_has_no_code_running_loader():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom)
                                                                 and node.module else [])
                for name in names:
                    if name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
                                              "jsonpickle", "joblib"):
                        found.append(f"{relative}:{node.lineno}: import {name}")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"{relative}:{node.lineno}: {name}()")
            elif name in NUMPY_LOADS and not any(
                k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in node.keywords
            ):
                found.append(f"{relative}:{node.lineno}: {name}() without allow_pickle=False")
            elif (name in ("importlib.import_module", "import_module") and relative not in IMPORT_MODULE_ALLOWED
                  and not (node.args and isinstance(node.args[0], ast.Constant))):
                # A literal name ("flash_attn", "vllm") cannot come from data.
                found.append(f"{relative}:{node.lineno}: {name}()")
    assert not found, "code-running loaders in karl_verl:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# Mastery tables and trainer states (JSON)


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])  # 0 is ASCII: it gets past UTF-8 decoding
@pytest.mark.parametrize("name", ["mastery.json", "mastery.pkl", "karl_mastery_state.json"])
def test_pickled_mastery_files_are_refused(tmp_path, marker, protocol, name):
    path = tmp_path / name
    path.write_bytes(_payload(marker, protocol))
    with pytest.raises(MasteryError, match=name):
        MasteryTable.load(path)
    with pytest.raises(MasteryError, match=name):
        MasteryState.load(path)
    with pytest.raises(MasteryError, match=name):
        compute_score("kvg", "<answer>(1,1),(2,2)</answer>", "<|object_ref_start|>E<|object_ref_end|>(1,1),(2,2)",
                      {"entity": "E"}, mastery_path=str(path))


@pytest.mark.parametrize("document", [
    {"E": {"py/object": "os.system", "py/state": "touch x"}},  # jsonpickle
    {"E": {"knowledge_category": {"py/reduce": [{"py/function": "builtins.exec"}, {"py/tuple": ["1"]}]}}},
    {"E": {"knowledge_category": "!!python/object/apply:builtins.exec ['1']"}},  # a YAML tag, as text
    {"E": {"__class__": "builtins.exec", "level": 1}},  # unknown keys are ignored, the level is read
    {"format": "karl-verl/mastery-v1", "entities": {"E": {"level": "__import__('os').getpid()"}}},
])
def test_code_shaped_json_is_only_data(tmp_path, marker, document):
    path = tmp_path / "mastery.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    try:
        table = MasteryTable.load(path)
    except MasteryError:
        return
    assert table.level_of("E") == 1


# ---------------------------------------------------------------------------------------------
# Datasets: JSONL and parquet


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_pickled_dataset_files_are_refused(tmp_path, marker, protocol):
    payload = _payload(marker, protocol)
    for name, read in [
        ("probe.jsonl", load_probe_set),
        ("probe.pkl", load_probe_set),
        ("annotations.jsonl", lambda p: list(iter_records(p, ReadOptions()))),
        ("annotations.pkl", lambda p: list(iter_records(p, ReadOptions()))),
        ("predictions.jsonl", lambda p: load_predictions(p, ["q1"])),
        ("bench.parquet", load_bench),
        ("probe.parquet", load_probe_set),
    ]:
        path = tmp_path / name
        path.write_bytes(payload)
        # The error type of a non-UTF-8 predictions file is a bad-data matter (test_bad_data.py);
        # here it only matters that nothing ran.
        with pytest.raises((DataError, ProbeError, ValueError)):
            read(path)


def _with_pickle_extension(table: pa.Table, column: str, payload: bytes) -> pa.Table:
    """Tag ``column`` as pyarrow's old pickled extension type (CVE-2023-47248's vector).

    pyarrow before 14.0.1 unpickled ``ARROW:extension:metadata`` of a field named
    ``arrow.py_extension_type`` while reading the file's schema.
    """
    fields = [
        field.with_metadata({b"ARROW:extension:name": b"arrow.py_extension_type",
                             b"ARROW:extension:metadata": payload}) if field.name == column else field
        for field in table.schema
    ]
    return table.cast(pa.schema(fields))


def test_parquet_with_a_pickled_extension_type_is_read_as_plain_data(tmp_path, marker):
    payload = _payload(marker, pickle.HIGHEST_PROTOCOL)
    image = _png()

    bench = pa.table({
        "question_id": ["q1"], "question": ["Find the Su-30."],
        "image": pa.array([{"bytes": image, "path": None}]),
        "answer": ["<|object_ref_start|>Su-30<|object_ref_end|><|box_start|>(10,10),(500,500)<|box_end|>"],
        "category": ["aircraft"],
    })
    pq.write_table(_with_pickle_extension(bench, "answer", payload), tmp_path / "bench.parquet")
    cases = load_bench(tmp_path / "bench.parquet", progress=False)
    assert [case.entity for case in cases] == ["Su-30"]

    probe = pa.table({"entity": ["a", "b", "c", "d"], "category": ["x"] * 4, "image": [image] * 4})
    pq.write_table(_with_pickle_extension(probe, "entity", payload), tmp_path / "probe.parquet")
    assert [item.entity for item in load_probe_set(tmp_path / "probe.parquet")] == ["a", "b", "c", "d"]

    annotations = pa.table({"image": [image], "entity": ["a"], "category": ["x"], "boxes": [[1.0, 1.0, 20.0, 20.0]],
                            "coords": ["pixel_xyxy"]})
    pq.write_table(_with_pickle_extension(annotations, "boxes", payload), tmp_path / "annotations.parquet")
    summary = convert_annotations([tmp_path / "annotations.parquet"], tmp_path / "out.parquet", progress=False)
    assert summary.rows == 1


# ---------------------------------------------------------------------------------------------
# Configs: YAML (OmegaConf / Hydra) and the karl section


def _yaml_payload(marker: Path) -> str:
    return (
        "karl:\n"
        "  reward:\n"
        f"    tau: !!python/object/apply:builtins.exec [\"open({str(marker)!r}, 'w').write('ran')\"]\n"
    )


def test_yaml_python_tags_are_refused(tmp_path, marker):
    from omegaconf import OmegaConf

    path = tmp_path / "recipe.yaml"
    path.write_text(_yaml_payload(marker), encoding="utf-8")
    with pytest.raises(Exception, match="python/object/apply"):
        OmegaConf.load(path)


def test_hydra_composition_refuses_python_tags(tmp_path, marker):
    from hydra import compose, initialize_config_dir

    (tmp_path / "recipe.yaml").write_text(_yaml_payload(marker), encoding="utf-8")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        with pytest.raises(Exception, match="python/object/apply"):
            compose(config_name="recipe")


@pytest.mark.parametrize("section", [
    {"reward": {"_target_": "builtins.exec", "_args_": ["open('x', 'w')"]}},
    {"_target_": "builtins.exec"},
    {"mastery": {"probe_data": "p.parquet", "_partial_": True, "_target_": "os.system"}},
])
def test_karl_section_is_never_instantiated(marker, section):
    with pytest.raises(ConfigError, match="unknown key"):
        KarlConfig.from_mapping(section)


def test_no_evaluating_resolver_is_registered(marker):
    from omegaconf import OmegaConf

    import karl_verl.integration  # noqa: F401  (everything karl-verl registers is in place)

    source = f"__import__('builtins').exec(\"open({str(marker)!r}, 'w')\")"
    for resolver in ("eval", "python", "exec"):
        config = OmegaConf.create({"reward": {"tau": "${" + resolver + ":" + json.dumps(source) + "}"}})
        with pytest.raises(Exception, match="Unsupported interpolation type|resolver"):
            KarlConfig.from_mapping(config)
