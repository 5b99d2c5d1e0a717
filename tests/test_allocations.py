import multiprocessing
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, insert
from sqlalchemy.exc import IntegrityError
from support import fake_nvml

from labvm_spawner.errors import LabVMError
from labvm_spawner.node.allocations import GpuAllocation, GpuAllocator, GpuUnavailable
from labvm_spawner.node.nvml import Gpu, read_inventory

A100 = "NVIDIA A100-SXM4-80GB"
MIXED = Path(__file__).parent / "fixtures" / "nvml_mixed_a100_a6000.json"


@pytest.fixture
def dgx(monkeypatch) -> list[Gpu]:
    fake_nvml.install(monkeypatch=monkeypatch)
    return read_inventory()


@pytest.fixture
def mixed(monkeypatch) -> list[Gpu]:
    fake_nvml.install(MIXED, monkeypatch=monkeypatch)
    return read_inventory()


@pytest.fixture
def db(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/labvm.sqlite"


def uuids(gpus):
    return [g.uuid for g in gpus]


def test_lowest_index_first_and_exclusive(db, dgx):
    alloc = GpuAllocator(db)
    a = alloc.allocate("alice", dgx, 2)
    b = alloc.allocate("bob", dgx, 3)
    assert [g.index for g in a] == [0, 1]
    assert [g.index for g in b] == [2, 3, 4]
    assert alloc.held("alice") == uuids(dgx[:2])
    assert alloc.holders() == {"alice": uuids(dgx[:2]), "bob": uuids(dgx[2:5])}


def test_shortage_message(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", dgx, 7)
    with pytest.raises(GpuUnavailable) as e:
        alloc.allocate("bob", dgx, 2, model=A100)
    assert str(e.value) == (
        "2 GPUs of model 'NVIDIA A100-SXM4-80GB' requested but only 1 is free on this node "
        "(7 held by other users)"
    )
    assert isinstance(e.value, LabVMError)
    assert alloc.held("bob") == []
    with pytest.raises(GpuUnavailable, match="requested but this node has only 8"):
        alloc.allocate("bob", dgx, 9)


def test_idempotent_for_same_request(db, dgx):
    alloc = GpuAllocator(db)
    first = alloc.allocate("alice", dgx, 2)
    t0 = alloc.records("alice")[0].allocated_at
    again = alloc.allocate("alice", dgx, 2, model=A100)
    assert again == first
    assert alloc.records("alice")[0].allocated_at == t0  # not a new allocation
    assert alloc.holders() == {"alice": uuids(first)}


def test_changed_request_reallocates(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", dgx, 2)
    alloc.allocate("bob", dgx, 1)  # index 2
    got = alloc.allocate("alice", dgx, 3)
    assert [g.index for g in got] == [0, 1, 3]
    assert alloc.held("bob") == [dgx[2].uuid]
    assert alloc.allocate("alice", dgx, 0) == []
    assert alloc.held("alice") == []


def test_refused_reallocation_keeps_what_was_held(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", dgx, 2)
    alloc.allocate("bob", dgx, 5)
    with pytest.raises(GpuUnavailable, match="4 GPUs requested but only 3 are free"):
        alloc.allocate("alice", dgx, 4)
    assert alloc.held("alice") == uuids(dgx[:2])


def test_model_selection(db, mixed):
    alloc = GpuAllocator(db)
    got = alloc.allocate("alice", mixed, 2, model="NVIDIA RTX A6000")
    assert [g.index for g in got] == [4, 5]
    assert {g.name for g in got} == {"NVIDIA RTX A6000"}
    got = alloc.allocate("bob", mixed, 3, model="NVIDIA A100 80GB PCIe")
    assert [g.index for g in got] == [0, 1, 2]
    with pytest.raises(GpuUnavailable) as e:
        alloc.allocate("carol", mixed, 3, model="NVIDIA RTX A6000")
    assert str(e.value) == (
        "3 GPUs of model 'NVIDIA RTX A6000' requested but only 2 are free on this node "
        "(2 held by other users)"
    )
    with pytest.raises(GpuUnavailable, match="No GPU of model 'NVIDIA H100' on this node"):
        alloc.allocate("carol", mixed, 1, model="NVIDIA H100")
    # Same count but a different model is a different request.
    got = alloc.allocate("alice", mixed, 1, model="NVIDIA A100 80GB PCIe")
    assert [(g.index, g.name) for g in got] == [(3, "NVIDIA A100 80GB PCIe")]
    assert alloc.held("alice") == [mixed[3].uuid]  # the A6000s went back


def test_model_change_for_same_count(db, mixed):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", mixed, 1, model="NVIDIA RTX A6000")
    got = alloc.allocate("alice", mixed, 1, model="NVIDIA A100 80GB PCIe")
    assert [(g.index, g.name) for g in got] == [(0, "NVIDIA A100 80GB PCIe")]
    assert alloc.held("alice") == [mixed[0].uuid]


def test_gpu_gone_from_inventory_reallocates(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", dgx, 1)
    got = alloc.allocate("alice", dgx[1:], 1)  # GPU 0 fell off the bus
    assert got == [dgx[1]]


def test_release(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", dgx, 3)
    assert alloc.release("alice") == uuids(dgx[:3])
    assert alloc.release("alice") == []
    assert alloc.holders() == {}
    assert [g.index for g in alloc.allocate("bob", dgx, 8)] == list(range(8))


def test_nodes_are_separate(db, dgx):
    a = GpuAllocator(db, node="gpu01")
    b = GpuAllocator(db, node="gpu02")
    a.allocate("alice", dgx, 8)
    assert len(b.allocate("bob", dgx, 8)) == 8
    assert a.holders() == {"alice": uuids(dgx)}


def test_allocation_time_recorded(db, dgx):
    alloc = GpuAllocator(db)
    before = datetime.now(UTC)
    alloc.allocate("alice", dgx, 1)
    (rec,) = alloc.records()
    assert rec.owner == "alice" and rec.uuid == dgx[0].uuid and rec.exclusive
    assert before - timedelta(seconds=1) <= rec.allocated_at <= datetime.now(UTC)


def test_unique_constraint_forbids_double_exclusive_rows(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", dgx, 1)
    row = {
        "node": "local",
        "owner": "mallory",
        "uuid": dgx[0].uuid,
        "exclusive_uuid": dgx[0].uuid,
        "gpu_index": 0,
        "model": A100,
        "exclusive": True,
        "allocated_at": datetime.now(UTC).replace(tzinfo=None),
    }
    with pytest.raises(IntegrityError), alloc.engine.begin() as conn:
        conn.execute(insert(GpuAllocation), row)


def test_sharing(db, dgx):
    alloc = GpuAllocator(db, sharing=True)
    a = alloc.allocate("alice", dgx, 4)
    b = alloc.allocate("bob", dgx, 6)
    c = alloc.allocate("carol", dgx, 8)
    assert [g.index for g in a] == [0, 1, 2, 3]
    # Untouched GPUs first, then the least shared.
    assert [g.index for g in b] == [0, 1, 4, 5, 6, 7]
    assert len(c) == 8
    # An exclusive user cannot get a GPU anyone holds, shared or not.
    excl = GpuAllocator(db)
    with pytest.raises(GpuUnavailable, match="none is free on this node \\(8 held"):
        excl.allocate("dave", dgx, 1)
    excl.release("carol")
    excl.release("bob")
    assert [g.index for g in excl.allocate("dave", dgx, 4)] == [4, 5, 6, 7]
    # ...and a sharing user cannot join an exclusive one.
    with pytest.raises(GpuUnavailable, match="5 GPUs requested but only 4 are free"):
        alloc.allocate("erin", dgx, 5)


def test_sharing_override_per_call(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", dgx, 8, sharing=True)
    assert len(alloc.allocate("bob", dgx, 2, sharing=True)) == 2
    with pytest.raises(GpuUnavailable):
        alloc.allocate("carol", dgx, 1)


def test_reconcile(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("alice", dgx, 2)
    alloc.allocate("bob", dgx, 1)
    alloc.allocate("carol", dgx, 1)
    released = alloc.reconcile({"bob"})
    assert released == {"alice": uuids(dgx[:2]), "carol": [dgx[3].uuid]}
    assert alloc.holders() == {"bob": [dgx[2].uuid]}
    assert alloc.reconcile({"bob"}) == {}


def test_threads_race_for_more_than_free(db, dgx):
    alloc = GpuAllocator(db)
    alloc.allocate("owner0", dgx, 3)  # 5 free
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def go(owner):
        barrier.wait()
        try:
            results[owner] = alloc.allocate(owner, dgx, 4)
        except GpuUnavailable as e:
            results[owner] = e

    threads = [threading.Thread(target=go, args=(o,)) for o in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o, r in results.items() if isinstance(r, list)]
    lost = [o for o, r in results.items() if isinstance(r, GpuUnavailable)]
    assert len(won) == 1 and len(lost) == 1, results
    assert [g.index for g in results[won[0]]] == [3, 4, 5, 6]
    assert str(results[lost[0]]) == (
        "4 GPUs requested but only 1 is free on this node (7 held by other users)"
    )
    assert alloc.held(lost[0]) == []


def test_many_threads_never_share_a_gpu(db, dgx):
    # Separate allocators too: each has its own engine and connections.
    barrier = threading.Barrier(12)
    got: dict[str, list[Gpu]] = {}
    refused: list[str] = []

    def go(i):
        alloc = GpuAllocator(db)
        barrier.wait()
        try:
            got[f"u{i}"] = alloc.allocate(f"u{i}", dgx, 2)
        except GpuUnavailable:
            refused.append(f"u{i}")
        alloc.close()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and len(refused) == 8
    all_uuids = [u for gpus in got.values() for u in uuids(gpus)]
    assert sorted(all_uuids) == sorted(uuids(dgx))
    assert GpuAllocator(db).holders() == {o: uuids(g) for o, g in got.items()}


def _race_in_process(db, owner, inventory, count, barrier, queue):
    alloc = GpuAllocator(db)
    barrier.wait()
    try:
        queue.put((owner, [g.index for g in alloc.allocate(owner, inventory, count)]))
    except GpuUnavailable as e:
        queue.put((owner, str(e)))


def test_processes_race_for_more_than_free(db, dgx):
    GpuAllocator(db).allocate("owner0", dgx, 2)  # 6 free
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_race_in_process, args=(db, o, dgx, 5, barrier, queue))
        for o in ("alice", "bob")
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    won = [o for o, r in results.items() if isinstance(r, list)]
    lost = [o for o, r in results.items() if isinstance(r, str)]
    assert len(won) == 1 and len(lost) == 1, results
    assert results[won[0]] == [2, 3, 4, 5, 6]
    assert results[lost[0]] == (
        "5 GPUs requested but only 1 is free on this node (7 held by other users)"
    )
    assert GpuAllocator(db).holders() == {"owner0": uuids(dgx[:2]), won[0]: uuids(dgx[2:7])}


def _crash_before_commit(db, inventory):
    alloc = GpuAllocator(db)
    # Die the moment the allocation would be committed: rows written, never committed.
    event.listen(alloc.engine, "commit", lambda conn: os._exit(3))
    alloc.allocate("crasher", inventory, 4)


def _crash_after_commit(db, inventory):
    GpuAllocator(db).allocate("ghost", inventory, 3)
    os._exit(4)  # the hub dies with the server's allocation recorded


def test_crash_mid_allocation_leaks_nothing(db, dgx):
    GpuAllocator(db)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_crash_before_commit, args=(db, dgx))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 3
    alloc = GpuAllocator(db)
    assert alloc.holders() == {}
    # And the dead process's lock is gone: the whole node can be allocated at once.
    assert len(alloc.allocate("alice", dgx, 8)) == 8


def test_reconcile_after_crash(db, dgx):
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_crash_after_commit, args=(db, dgx))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 4
    # Hub restart: a new allocator sees the leftover rows; "ghost" has no running server.
    alloc = GpuAllocator(db)
    assert alloc.holders() == {"ghost": uuids(dgx[:3])}
    alloc.allocate("bob", dgx, 1)
    assert alloc.reconcile({"bob"}) == {"ghost": uuids(dgx[:3])}
    assert alloc.holders() == {"bob": [dgx[3].uuid]}
    assert [g.index for g in alloc.allocate("carol", dgx, 3)] == [0, 1, 2]


def test_creates_database_directory(tmp_path, dgx):
    path = tmp_path / "var" / "lib" / "labvm" / "labvm.sqlite"
    GpuAllocator(f"sqlite:///{path}").allocate("alice", dgx, 1)
    assert path.exists()


def test_memory_sqlite_refused():
    with pytest.raises(ValueError, match="file-backed"):
        GpuAllocator("sqlite://")
