"""cliprpn_core.node_names, the one table of this pack's node class names, against the ids the pack
really registers: the nodes' own schemas (read through pack_schema, no ComfyUI needed), the committed
object_info snapshot, node_list.json, the workflows `cliprpn batch` sends, and, with COMFYUI_DIR, a
live server's /object_info."""
from __future__ import annotations

import json

import pack_schema as ps
import pytest
import workflow_graphs as wg

from cliprpn_core import batch as B
from cliprpn_core import node_names as N

TABLE = set(N.NODE_IDS.values())


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    return set(ps.pack_object_info(tmp_path_factory.mktemp("node_names")))


def test_the_table_is_exactly_the_registered_node_ids(registered):
    assert len(TABLE) == len(N.NODE_IDS), "two roles share one node id"
    assert TABLE == registered
    assert set(N.DERAIN_NODES) <= TABLE


def test_nodes_take_their_ids_from_the_table():
    for path in sorted((ps.REPO / "nodes").glob("*.py")):
        assert 'node_id="' not in path.read_text(), f"{path.name} hard-codes a node id; use cliprpn_core.node_names"


def test_snapshot_and_node_list_agree_with_the_table():
    snapshot = wg.load_snapshot()
    assert {k for k in snapshot if k.startswith("CLIPRPN")} == TABLE
    assert set(json.loads((ps.REPO / "node_list.json").read_text())) == TABLE


def test_batch_names_our_nodes_from_the_table():
    assert (B.LOADER, B.PERCEIVER, B.ROUTER) == (N.LOADER, N.RAIN_PERCEIVER, N.EXPERT_ROUTER)
    assert B.DERAIN_NODES == N.DERAIN_NODES
    ours = {n["class_type"] for n in B.BUILTIN_BASIC.values() if n["class_type"].startswith("CLIPRPN")}
    assert ours and ours <= TABLE
    for path in sorted(B.API_WORKFLOWS.glob("*.json")):
        wf = json.loads(path.read_text())
        assert {n["class_type"] for n in wf.values() if n["class_type"].startswith("CLIPRPN")} <= TABLE, path.name


def test_a_live_server_registers_the_table(server):
    info = server.object_info()
    assert TABLE <= set(info)
    assert {k for k, v in info.items() if v.get("category") == "image/restoration/CLIP-RPN"} == TABLE
