"""The manager's SQLite state: migrations, names, transitions, concurrency, events."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from warden._errors import (
    AdmissionError,
    NameConflictError,
    StateTransitionError,
    StoreError,
    VMNotFoundError,
    WardenError,
)
from warden.config import Paths
from warden.store import Reservations, Store, db_path
from warden.store.db import MIGRATIONS, SCHEMA_VERSION, migrate
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState

S = VMState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    with Store(path, clock=FakeClock()) as s:
        yield s


def spec(name: str | None = None, memory: int = 128, vcpus: int = 1) -> VMSpec:
    return VMSpec(name=name, memory_mib=memory, vcpus=vcpus, labels={"team": "a"})


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def user_version(path: Path) -> int:
    with raw(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def schema(path: Path) -> list[tuple[str, str]]:
    with raw(path) as conn:
        return conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()


# -- opening and migrations ------------------------------------------------------------------


def test_db_path_is_under_warden_home(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "home")
    assert db_path(paths) == tmp_path / "home" / "state.db"
    with Store.open(paths) as s:
        assert s.path == tmp_path / "home" / "state.db"
    assert stat.S_IMODE((tmp_path / "home" / "state.db").stat().st_mode) == 0o600


def test_migrates_an_empty_file(store: Store, path: Path) -> None:
    assert SCHEMA_VERSION >= 1
    assert user_version(path) == SCHEMA_VERSION
    names = {n for n, _ in schema(path)}
    assert {"vms", "events"} <= names
    with raw(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    own = store._conn
    assert own is not None
    assert own.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert own.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_reopen_is_idempotent_and_keeps_data(path: Path) -> None:
    with Store(path) as s:
        s.create_vm("a1", spec("alpha"))
    before = schema(path)
    for _ in range(3):
        with Store(path) as s:
            assert s.get_vm("a1") is not None
            assert len(s.list_vms()) == 1
    assert schema(path) == before
    assert user_version(path) == SCHEMA_VERSION


def test_newer_schema_is_refused_untouched(path: Path) -> None:
    Store(path).close()
    with raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = schema(path)
    with pytest.raises(StoreError, match=r"newer warden") as info:
        Store(path)
    assert f"version {SCHEMA_VERSION + 1}" in str(info.value)
    assert user_version(path) == SCHEMA_VERSION + 1
    assert schema(path) == before


def test_failed_migration_changes_nothing(path: Path) -> None:
    broken = (("CREATE TABLE first_step (x INTEGER)",), ("CREATE TABLE t (x)", "NOT SQL AT ALL"))
    conn = raw(path)
    with pytest.raises(StoreError, match="schema version 2"):
        migrate(conn, broken)
    assert not conn.in_transaction
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    # Pending steps after a good version are also all-or-nothing.
    assert migrate(conn, MIGRATIONS) == SCHEMA_VERSION
    before = conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall()
    with pytest.raises(StoreError):
        migrate(conn, (*MIGRATIONS, ("CREATE TABLE extra (x)",), ("BROKEN",)))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall() == before
    conn.close()


def test_not_a_database_is_a_clear_error(path: Path) -> None:
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a warden state database"):
        Store(path)


def test_closed_store_refuses(path: Path) -> None:
    s = Store(path)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list_vms()


# -- VMs ---------------------------------------------------------------------------------------


def test_create_and_read_back(store: Store, tmp_path: Path) -> None:
    sp = VMSpec(name="web", memory_mib=256, vcpus=2, image="img", env={"K": "v"}, labels={"a": "b"})
    row = store.create_vm("id1", sp, runtime_dir=tmp_path / "run" / "id1")
    assert row.id == "id1"
    assert row.name == "web"
    assert row.state is S.CREATING
    assert (row.image, row.vcpus, row.memory_mib, row.labels) == ("img", 2, 256, {"a": "b"})
    assert row.runtime_dir == tmp_path / "run" / "id1"
    assert row.created_at > 0
    assert row.started_at is row.stopped_at is row.qemu_pid is row.exit_code is None
    assert row.spec() == sp
    assert store.get_vm("id1") == row
    assert store.get_vm_by_name("web") == row
    assert store.get_vm("nope") is None
    assert store.get_vm_by_name("nope") is None


def test_duplicate_name_is_refused_without_a_trace(store: Store) -> None:
    store.create_vm("a", spec("same"))
    store.update_state("a", S.FAILED)  # a name is held until the VM is removed
    events = store.events_since(0)
    with pytest.raises(NameConflictError, match="'same'") as info:
        store.create_vm("b", spec("same"))
    assert isinstance(info.value, WardenError)
    assert store.get_vm("b") is None
    assert [v.id for v in store.list_vms(all=True)] == ["a"]
    assert store.events_since(0) == events

    def full(r: Reservations) -> None:
        raise AdmissionError("full")

    with pytest.raises(NameConflictError):  # the name is checked before admission
        store.create_vm("b", spec("same"), admit=full)
    # Unnamed VMs never clash; a removed VM frees its name.
    store.create_vm("c", spec(None))
    store.create_vm("d", spec(None))
    store.delete_vm("a")
    assert store.create_vm("b", spec("same")).name == "same"


def test_refused_admission_leaves_no_trace(store: Store) -> None:
    store.create_vm("a", spec("a", memory=200, vcpus=2))
    seen: list[Reservations] = []

    def refuse(r: Reservations) -> None:
        seen.append(r)
        raise AdmissionError("full")

    events = store.events_since(0)
    with pytest.raises(AdmissionError):
        store.create_vm("b", spec("b"), admit=refuse)
    assert seen == [Reservations(memory_mib=200, vcpus=2, vms=1)]
    assert store.get_vm("b") is None
    assert store.events_since(0) == events


# The allowed changes, written out here independently of the module's table.
ALLOWED = {
    (S.CREATING, S.RUNNING),
    (S.CREATING, S.FAILED),
    (S.RUNNING, S.STOPPING),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.STOPPED),
    (S.RUNNING, S.UNHEALTHY),
    (S.RUNNING, S.PAUSED),
    (S.PAUSED, S.RUNNING),
    (S.PAUSED, S.STOPPING),
    (S.PAUSED, S.STOPPED),
    (S.PAUSED, S.FAILED),
    (S.UNHEALTHY, S.RUNNING),
    (S.UNHEALTHY, S.STOPPING),
    (S.UNHEALTHY, S.STOPPED),
    (S.UNHEALTHY, S.FAILED),
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.FAILED),
}
PATH_TO = {
    S.CREATING: [],
    S.RUNNING: [S.RUNNING],
    S.UNHEALTHY: [S.RUNNING, S.UNHEALTHY],
    S.PAUSED: [S.RUNNING, S.PAUSED],
    S.STOPPING: [S.RUNNING, S.STOPPING],
    S.STOPPED: [S.RUNNING, S.STOPPED],
    S.FAILED: [S.FAILED],
}


@pytest.mark.parametrize(("old", "new"), list(itertools.product(S, S)))
def test_transitions(store: Store, old: VMState, new: VMState) -> None:
    store.create_vm("v", spec())
    for step in PATH_TO[old]:
        store.update_state("v", step)
    before = store.get_vm("v")
    assert before is not None and before.state is old
    if (old, new) in ALLOWED:
        assert store.update_state("v", new).state is new
    else:
        with pytest.raises(StateTransitionError, match=f"is {old.value} and cannot become"):
            store.update_state("v", new)
        assert store.get_vm("v") == before


def test_state_timestamps_exit_code_and_events(store: Store) -> None:
    store.create_vm("v", spec("n"))
    running = store.update_state("v", S.RUNNING)
    assert running.started_at is not None and running.stopped_at is None
    store.update_state("v", S.STOPPING)
    stopped = store.update_state("v", S.STOPPED, exit_code=0)
    assert stopped.started_at == running.started_at
    assert stopped.stopped_at is not None and stopped.stopped_at > running.started_at
    assert stopped.exit_code == 0 and stopped.error is None
    kinds = [(e.kind, e.detail.get("from")) for e in store.events_since(0, vm_id="v")]
    assert kinds == [
        ("created", None),
        ("running", "creating"),
        ("stopping", "running"),
        ("stopped", "stopping"),
    ]
    store.create_vm("w", spec())
    failed = store.update_state("w", S.FAILED, exit_code=137, error="QEMU died")
    assert (failed.exit_code, failed.error, failed.started_at) == (137, "QEMU died", None)
    assert store.events_since(0, vm_id="w")[-1].detail == {
        "from": "creating",
        "exit_code": 137,
        "error": "QEMU died",
    }


def test_unknown_ids(store: Store) -> None:
    with pytest.raises(VMNotFoundError, match="'ghost'"):
        store.update_state("ghost", S.RUNNING)
    with pytest.raises(VMNotFoundError):
        store.set_pid("ghost", 1, 2)
    with pytest.raises(VMNotFoundError):
        store.delete_vm("ghost")


def test_set_pid(store: Store) -> None:
    store.create_vm("v", spec())
    store.set_pid("v", 4242, 987654)
    row = store.get_vm("v")
    assert row is not None and (row.qemu_pid, row.qemu_start) == (4242, 987654)
    store.set_pid("v", None, None)
    row = store.get_vm("v")
    assert row is not None and row.qemu_pid is None and row.qemu_start is None


def test_delete_only_a_finished_vm(store: Store) -> None:
    store.create_vm("v", spec("n"))
    for state in (None, S.RUNNING, S.STOPPING):
        if state is not None:
            store.update_state("v", state)
        with pytest.raises(StateTransitionError, match="stop it"):
            store.delete_vm("v")
        assert store.get_vm("v") is not None
    store.update_state("v", S.STOPPED)
    store.delete_vm("v")
    assert store.get_vm("v") is None
    assert store.list_vms(all=True) == []
    last = store.events_since(0, vm_id="v")[-1]
    assert (last.kind, last.detail) == ("removed", {"name": "n"})


def test_list_and_reservations(store: Store) -> None:
    assert store.reservations() == Reservations(memory_mib=0, vcpus=0, vms=0)
    layout = [
        ("c", S.CREATING, 150, 1),
        ("r", S.RUNNING, 200, 2),
        ("u", S.UNHEALTHY, 350, 3),
        ("s", S.STOPPING, 400, 4),
        ("x", S.STOPPED, 800, 8),
        ("f", S.FAILED, 1600, 16),
    ]
    for vm_id, state, memory, vcpus in layout:
        store.create_vm(vm_id, spec(vm_id, memory=memory, vcpus=vcpus))
        for step in PATH_TO[state]:
            store.update_state(vm_id, step)
    assert [v.id for v in store.list_vms()] == ["c", "r", "u", "s"]
    assert [v.id for v in store.list_vms(all=True)] == ["c", "r", "u", "s", "x", "f"]
    res = store.reservations()
    assert res == Reservations(memory_mib=1100, vcpus=10, vms=4)
    memory, vcpus, _ = res
    assert (memory, vcpus) == (1100, 10)


# -- events ------------------------------------------------------------------------------------


def test_events_order_filter_and_limit(store: Store) -> None:
    assert store.latest_event_id() == 0
    assert store.events_since(0) == []
    store.create_vm("a", spec())
    store.create_vm("b", spec())
    store.update_state("a", S.RUNNING)
    e = store.append_event("b", "exec", {"argv": ["true"], "exit_code": 0})
    assert (e.vm_id, e.kind, e.detail) == ("b", "exec", {"argv": ["true"], "exit_code": 0})
    events = store.events_since(0)
    assert [(x.vm_id, x.kind) for x in events] == [
        ("a", "created"),
        ("b", "created"),
        ("a", "running"),
        ("b", "exec"),
    ]
    ids = [x.id for x in events]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [x.at for x in events] == sorted(x.at for x in events)
    assert events[-1] == e
    assert store.latest_event_id() == e.id
    assert store.events_since(e.id) == []
    assert store.events_since(ids[1]) == events[2:]
    assert [x.kind for x in store.events_since(0, vm_id="b")] == ["created", "exec"]
    assert store.events_since(0, limit=2) == events[:2]


def test_event_ids_are_never_reused(path: Path) -> None:
    with Store(path) as s:
        s.create_vm("a", spec())
        s.update_state("a", S.FAILED)
        s.delete_vm("a")
        last = s.latest_event_id()
    with Store(path) as s:
        s.create_vm("b", spec())
        assert s.events_since(last)[0].id == last + 1


# -- concurrency -------------------------------------------------------------------------------

THREADS = 8
PER_THREAD = 25


def run_threads(target: Callable[[int], None], n: int = THREADS) -> list[Exception]:
    errors: list[Exception] = []
    barrier = threading.Barrier(n)

    def wrapper(i: int) -> None:
        barrier.wait()
        try:
            target(i)
        except Exception as exc:  # noqa: BLE001 (collected for the test to check)
            errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return errors


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_concurrent_writers(path: Path, shared: bool) -> None:
    main = Store(path)

    def work(i: int) -> None:
        s = main if shared else Store(path)
        try:
            for j in range(PER_THREAD):
                vm_id = f"t{i}-{j}"
                s.create_vm(vm_id, spec(f"n{i}-{j}"))
                s.update_state(vm_id, S.RUNNING)
                s.append_event(vm_id, "exec", {"j": j})
        finally:
            if not shared:
                s.close()

    assert run_threads(work) == []
    total = THREADS * PER_THREAD
    assert len(main.list_vms()) == total
    assert main.reservations() == Reservations(memory_mib=128 * total, vcpus=total, vms=total)
    events = main.events_since(0, limit=10 * total)
    # Every write got the next id, none lost or duplicated, and each VM's events are in order.
    assert [e.id for e in events] == list(range(1, 3 * total + 1))
    for i, j in itertools.product(range(THREADS), range(PER_THREAD)):
        kinds = [e.kind for e in events if e.vm_id == f"t{i}-{j}"]
        assert kinds == ["created", "running", "exec"]
    main.close()


def test_concurrent_creates_of_one_name(path: Path) -> None:
    Store(path).close()
    won: list[int] = []

    def work(i: int) -> None:
        with Store(path) as s:
            s.create_vm(f"id{i}", spec("contested"))
            won.append(i)

    errors = run_threads(work)
    assert len(won) == 1
    assert len(errors) == THREADS - 1
    assert all(isinstance(e, NameConflictError) for e in errors)
    with Store(path) as s:
        assert [v.id for v in s.list_vms()] == [f"id{won[0]}"]


def test_admission_check_and_insert_are_atomic_across_processes(path: Path) -> None:
    """Each thread has its own connection (as another process would): at most 3 get in."""
    Store(path).close()

    def at_most_three(r: Reservations) -> None:
        if r.vms >= 3:
            raise AdmissionError("full")

    def work(i: int) -> None:
        with Store(path) as s:
            s.create_vm(f"id{i}", spec(), admit=at_most_three)

    errors = run_threads(work)
    assert len(errors) == THREADS - 3
    assert all(isinstance(e, AdmissionError) for e in errors)
    with Store(path) as s:
        assert s.reservations().vms == 3


async def test_called_from_asyncio_through_to_thread(store: Store) -> None:
    async def one(i: int) -> None:
        await asyncio.to_thread(store.create_vm, f"a{i}", spec())
        await asyncio.to_thread(store.update_state, f"a{i}", S.RUNNING)

    await asyncio.gather(*(one(i) for i in range(20)))
    rows = await asyncio.to_thread(store.list_vms)
    assert {r.state for r in rows} == {S.RUNNING} and len(rows) == 20
