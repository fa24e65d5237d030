"""The two tables (and two trainer states) the crash tests alternate between, and a fast import.

Shared by the test and its child processes (``save_loop.py``, ``load_loop.py``), so that all of
them agree on what "table A" and "table B" are.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def import_without_plugin_registration() -> None:
    """Make ``import karl_verl.<module>`` run that module's real code without ``karl_verl/__init__``.

    Importing the package registers karl-verl into verl (it imports verl, torch and Ray: about 8 s
    per process). A child that only saves and loads tables needs none of it, and the crash test
    starts dozens of children, so the package is entered through a bare namespace module instead.
    """
    if "karl_verl" in sys.modules:
        return
    spec = importlib.util.find_spec("karl_verl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("karl_verl is not installed in this interpreter")
    package = types.ModuleType("karl_verl")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["karl_verl"] = package


#: Large enough that one save takes milliseconds, so random kills land inside writes.
NUM_ENTITIES = 3000


def table_pair():
    """Tables A and B: same entities, different scores, levels and meta (so a mix is detectable)."""
    from karl_verl.mastery import MasteryTable

    names = [f"entity {i:05d} of a fine-grained category" for i in range(NUM_ENTITIES)]
    a = MasteryTable.from_scores({n: (i % 97) / 96 for i, n in enumerate(names)}, epoch=1, meta={"which": "A"})
    b = MasteryTable.from_scores({n: 1 - (i % 89) / 88 for i, n in enumerate(names)}, epoch=2, meta={"which": "B"})
    return a, b


def state_pair():
    """Two trainer mastery states (table, base table, refresh history, online posterior)."""
    from karl_verl.mastery_state import MasteryState, RefreshRecord
    from karl_verl.online import OnlineMastery

    a_table, b_table = table_pair()
    states = []
    for step, table in ((10, a_table), (20, b_table)):
        online = OnlineMastery(prior_alpha=1.0, prior_beta=1.0, decay=0.9)
        online.observe([f"entity {i:05d} of a fine-grained category" for i in range(500)],
                       [float((i * step) % 3 == 0) for i in range(500)])
        history = [RefreshRecord(step=s, epoch=s // 10, trigger="epoch", source="probe", num_entities=len(table))
                   for s in range(1, step + 1)]
        states.append(MasteryState(table=table, base_table=table, history=history, online=online,
                                   unknown_entities={f"unknown {step}"}))
    return states[0], states[1]


def pair(kind: str):
    return table_pair() if kind == "table" else state_pair()


def loader(kind: str):
    if kind == "table":
        from karl_verl.mastery import MasteryTable

        return MasteryTable.load
    from karl_verl.mastery_state import MasteryState

    return MasteryState.load
