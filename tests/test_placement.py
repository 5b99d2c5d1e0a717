"""Placement rules: where a server starts (pure functions, no nodes needed)."""

from __future__ import annotations

import pytest

from labvm_spawner.cluster import NodeView
from labvm_spawner.errors import LabVMError
from labvm_spawner.placement import choose_node

A100 = "NVIDIA A100-SXM4-80GB"
A6000 = "NVIDIA RTX A6000"
LIMITS = {"cpus": 2, "mem_bytes": 4 << 30, "pids": 100, "blkio_weight": None,
          "io_read_bps": None, "io_write_bps": None, "disk_bytes": None,
                      "store_bytes": None}


def limits(**kw):
    from labvm_spawner.policy import Limits

    return Limits(**{**LIMITS, **kw})


def node(name: str, gpus: list[tuple[str, str | None]], up: bool = True, drained: bool = False,
         cpus: int = 32, committed: float = 0, mem: int = 256 << 30, mem_used: int = 0,
         servers: tuple[str, ...] = ()) -> NodeView:
    info = {
        "gpus": [{"index": i, "uuid": f"{name}-{i}", "name": m, "holder": h}
                 for i, (m, h) in enumerate(gpus)],
        "cpus": cpus, "cpus_committed": committed, "mem_bytes": mem, "mem_committed": mem_used,
        "servers": {s: {"running": True} for s in servers},
    }
    return NodeView(name, up, drained, info)


def nodes(*views: NodeView) -> dict[str, NodeView]:
    return {v.name: v for v in views}


def test_new_users_go_where_their_gpus_fit_and_pack():
    ns = nodes(node("a", [(A100, None)] * 4), node("b", [(A100, "x"), (A100, None)]),
               node("c", [(A6000, None)] * 2))
    # b leaves no A100 idle for a 1-GPU user; a 2-GPU user only fits on a.
    assert choose_node(ns, "u", 1, A100, limits()) == "b"
    assert choose_node(ns, "u", 2, A100, limits()) == "a"
    assert choose_node(ns, "u", 2, A6000, limits()) == "c"
    # CPU-only users stay off the nodes with the most idle GPUs.
    assert choose_node(ns, "u", 0, None, limits()) == "b"


def test_drained_and_down_nodes_take_no_new_users():
    ns = nodes(node("a", [(A100, None)] * 2, drained=True), node("b", [(A100, None)] * 2, up=False),
               node("c", [(A100, None)]))
    assert choose_node(ns, "u", 1, None, limits()) == "c"
    with pytest.raises(LabVMError, match="node a is drained.*node b is down"):
        choose_node(ns, "u", 2, None, limits())


def test_memory_is_a_hard_line_cpu_only_ranks():
    ns = nodes(node("a", [], mem=8 << 30, mem_used=6 << 30),
               node("b", [], cpus=4, committed=12))
    assert choose_node(ns, "u", 0, None, limits(mem_bytes=4 << 30)) == "b"  # CPU overcommitted
    with pytest.raises(LabVMError, match="MiB to spare"):
        choose_node(nodes(ns["a"]), "u", 0, None, limits(mem_bytes=4 << 30))


def test_a_user_stays_on_their_node_and_pins_win_for_new_ones():
    ns = nodes(node("a", [(A100, None)] * 4), node("b", [(A100, None)]))
    assert choose_node(ns, "u", 0, None, limits(), placed="a") == "a"
    assert choose_node(ns, "u", 1, None, limits(), pinned="a") == "a"
    with pytest.raises(LabVMError, match="lives on node b, which cannot start it now"):
        choose_node(ns, "u", 2, None, limits(), placed="b")
    down = nodes(node("a", [], up=False))
    with pytest.raises(LabVMError, match="data is on node a, which is down.*labvm migrate"):
        choose_node(down, "u", 0, None, limits(), placed="a")
    with pytest.raises(LabVMError, match="pinned to node z, which is not registered"):
        choose_node(ns, "u", 0, None, limits(), pinned="z")


def test_own_gpus_and_own_memory_count_as_available_on_a_restart():
    ns = nodes(node("a", [(A100, "u"), (A100, "v")], mem=4 << 30, mem_used=4 << 30,
                    servers=("u",)))
    assert choose_node(ns, "u", 1, A100, limits(), placed="a") == "a"
    with pytest.raises(LabVMError, match="2 GPUs of model .* requested but only 1 is free"):
        choose_node(ns, "u", 2, A100, limits(), placed="a")
