"""The manager's state in SQLite: every VM it holds, and their lifecycle events.

The file is ``$WARDEN_HOME/state.db`` (:func:`db_path`), mode 0600 (VM specs hold environment
variables), in WAL mode with ``foreign_keys=ON`` and a busy timeout.

How to call it
--------------
Every method is synchronous and short: one transaction, no I/O but SQLite's. A :class:`Store`
holds one connection guarded by a lock, so any thread may call any method. An asyncio daemon
calls it off the event loop, so that a wait for another process's write lock (up to
``busy_timeout_ms``) never stalls the loop::

    row = await asyncio.to_thread(store.create_vm, vm_id, spec, admit=admit)

Several :class:`Store` objects, in one process or several, may open the same file: WAL lets
readers run beside the one writer, and every write is a ``BEGIN IMMEDIATE`` transaction that
waits for the write lock. Because write transactions never interleave, event ids are handed out
in commit order, so a follower polling :meth:`Store.events_since` never skips one.

Schema
------
``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``; the version is kept in
``PRAGMA user_version``. On open, the pending steps run in one transaction with the new version,
so a failed step leaves the file as it was, and reopening an up-to-date file changes nothing.
A file from a newer warden (a higher version than ``len(MIGRATIONS)``) is refused, never
touched. Append a new step to change the schema; never edit a released one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from warden._errors import (
    NameConflictError,
    StateTransitionError,
    StoreError,
    VMNotFoundError,
)
from warden.config import Paths, private_dir
from warden.vmm.spec import VMSpec
from warden.vmm.state import VMState, check_transition

DB_NAME = "state.db"
DAEMON_OWNER = "root"
"""The owner of VMs no principal asked for (warm pool members until taken) and of VMs recorded
before owners were: the daemon's own user (the name of ``auth.principal.LOCAL_ADMIN``)."""
BUSY_TIMEOUT_MS = 5000

ACTIVE_STATES: frozenset[VMState] = frozenset(
    {VMState.CREATING, VMState.RUNNING, VMState.UNHEALTHY, VMState.PAUSED, VMState.STOPPING}
)
"""States whose VM holds (or may hold) a QEMU process: they count against host capacity. A
paused VM has none, but keeps its reservation so that its resume is never refused."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: VMs and their lifecycle events. events.vm_id is not a foreign key on purpose: the
    # history of a VM outlives its row (its "removed" event is written as the row goes).
    (
        """
        CREATE TABLE vms (
            id          TEXT PRIMARY KEY,
            name        TEXT UNIQUE,
            state       TEXT NOT NULL,
            spec_json   TEXT NOT NULL,
            image       TEXT NOT NULL,
            vcpus       INTEGER NOT NULL,
            memory_mib  INTEGER NOT NULL,
            labels_json TEXT NOT NULL,
            created_at  REAL NOT NULL,
            started_at  REAL,
            stopped_at  REAL,
            qemu_pid    INTEGER,
            qemu_start  INTEGER,
            runtime_dir TEXT,
            exit_code   INTEGER,
            error       TEXT
        ) STRICT
        """,
        "CREATE INDEX vms_state ON vms (state)",
        """
        CREATE TABLE events (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            vm_id       TEXT NOT NULL,
            at          REAL NOT NULL,
            kind        TEXT NOT NULL,
            detail_json TEXT NOT NULL
        ) STRICT
        """,
        "CREATE INDEX events_vm ON events (vm_id, id)",
    ),
    # 2: who owns each VM (the principal that created it; policy/access.py). VMs recorded
    # before belong to the daemon's own user, root, whom the default policy makes an admin.
    ("ALTER TABLE vms ADD COLUMN owner TEXT NOT NULL DEFAULT 'root'",),
)
SCHEMA_VERSION = len(MIGRATIONS)

# "state IN (?, ?, ...)" and its parameters: the filter for ACTIVE_STATES.
_ACTIVE_PARAMS = tuple(sorted(s.value for s in ACTIVE_STATES))
_WHERE_ACTIVE = f" WHERE state IN ({', '.join('?' * len(_ACTIVE_PARAMS))})"

_VM_COLUMNS = (
    "id, name, state, spec_json, image, vcpus, memory_mib, labels_json, created_at, started_at,"
    " stopped_at, qemu_pid, qemu_start, runtime_dir, exit_code, error, owner"
)


def db_path(paths: Paths) -> Path:
    """Where the manager's state lives: ``$WARDEN_HOME/state.db``."""
    return paths.home / DB_NAME


@dataclass(frozen=True)
class VMRow:
    """One VM as stored. ``spec()`` parses the full spec it was created from."""

    id: str
    name: str | None
    state: VMState
    spec_json: str
    image: str
    vcpus: int
    memory_mib: int
    labels: dict[str, str]
    created_at: float
    started_at: float | None
    stopped_at: float | None
    qemu_pid: int | None
    qemu_start: int | None
    """The QEMU process's start time in clock ticks since boot (``ownership.proc_start_time``),
    so a recycled pid is never mistaken for it."""
    runtime_dir: Path | None
    exit_code: int | None
    error: str | None
    owner: str = DAEMON_OWNER
    """The name of the principal that created it (policy/access.py selects by it)."""

    def spec(self) -> VMSpec:
        return VMSpec.model_validate_json(self.spec_json)

    @property
    def template(self) -> str | None:
        """The template it was cloned from, if any (without parsing the whole spec)."""
        value = json.loads(self.spec_json).get("template")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class EventRow:
    id: int
    vm_id: str
    at: float
    kind: str
    detail: dict[str, Any]


class ActiveVM(NamedTuple):
    """One VM in ACTIVE_STATES, as admission control charges it."""

    id: str
    memory_mib: int
    vcpus: int
    state: str


@dataclass(frozen=True)
class Reservations:
    """What the VMs in ACTIVE_STATES hold: guest memory, vcpus, and how many VMs they are
    (admission control adds a per-VM overhead to the memory); ``active`` lists them one by
    one (for charges by measured use; not part of equality)."""

    memory_mib: int
    vcpus: int
    vms: int
    active: tuple[ActiveVM, ...] = field(default=(), compare=False, repr=False)

    def __iter__(self) -> Iterator[int]:
        """Unpacks as ``memory_mib, vcpus, vms`` (it was a named tuple of those)."""
        return iter((self.memory_mib, self.vcpus, self.vms))


def migrate(conn: sqlite3.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the schema up to ``len(migrations)`` in one transaction; return that version.

    ``conn`` must be in autocommit mode (``isolation_level=None``) with no open transaction.
    Raises StoreError if the file is newer than ``migrations`` or a step fails (then nothing
    of the pending steps is kept).
    """
    target = len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > target:
            raise StoreError(
                f"the state database has schema version {current}, but this warden knows only "
                f"up to {target}: it was written by a newer warden. Run that version, or move "
                "the file away to start with an empty state (warden then forgets its VMs)."
            )
        for version in range(current, target):
            for statement in migrations[version]:
                try:
                    conn.execute(statement)
                except sqlite3.Error as exc:
                    raise StoreError(
                        f"migrating the state database to schema version {version + 1} "
                        f"failed: {exc}"
                    ) from exc
        if current != target:
            # PRAGMA takes no parameters; target is an int we computed.
            conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    return target


class Store:
    """The manager's state database. Thread-safe; see the module docstring for how to call it.

    Every mutation that changes a VM's life also appends its event in the same transaction:
    ``created`` (create_vm), the new state's name (update_state: ``running``, ``stopping``,
    ``stopped``, ``failed``, with ``{"from": old, ...}``) and ``removed`` (delete_vm).
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = _connect(path, busy_timeout_ms)
        try:
            migrate(self._conn)
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"cannot open the state database {path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(cls, paths: Paths) -> Store:
        """Open (creating and migrating as needed) ``$WARDEN_HOME/state.db``."""
        return cls(db_path(paths))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- VMs -------------------------------------------------------------------------------

    def create_vm(
        self,
        vm_id: str,
        spec: VMSpec,
        *,
        runtime_dir: Path | None = None,
        admit: Callable[[Reservations], None] | None = None,
        owner: str = DAEMON_OWNER,
    ) -> VMRow:
        """Insert a VM in state ``creating``, owned by ``owner``, and its ``created`` event,
        atomically.

        ``admit`` is called inside the write transaction with the current reservations, after
        the name check and before the insert; if it raises (AdmissionError), nothing is
        written. Because the transaction holds the database's write lock, no other create can
        slip in between the check and the insert, even from another process.

        Raises NameConflictError if ``spec.name`` is taken (by a VM in any state).
        """
        now = self._clock()
        with self._write() as conn:
            if spec.name is not None and _name_taken(conn, spec.name):
                raise _name_conflict(spec.name)
            if admit is not None:
                admit(_reservations(conn))
            _insert_vm(conn, vm_id, spec, now, runtime_dir, owner)
            _insert_event(conn, vm_id, now, "created", _created_details(spec, owner))
            return _get(conn, vm_id)

    def hand_over(self, vm_id: str, spec: VMSpec, *, owner: str = DAEMON_OWNER) -> VMRow:
        """Give the running VM ``vm_id`` (a warm pool's) the name, labels, spec and owner of
        the create it now serves, with a ``taken`` event. Raises NameConflictError if the name
        is taken, VMNotFoundError if the VM is gone; then nothing changes."""
        labels = json.dumps(spec.labels, sort_keys=True)
        with self._write() as conn:
            if spec.name is not None and _name_taken(conn, spec.name):
                raise _name_conflict(spec.name)
            changed = conn.execute(
                "UPDATE vms SET name = ?, spec_json = ?, labels_json = ?, owner = ? WHERE id = ?",
                (spec.name, spec.model_dump_json(), labels, owner, vm_id),
            ).rowcount
            if not changed:
                raise VMNotFoundError(f"no VM has id {vm_id!r}")
            detail = {"name": spec.name, "owner": owner}
            _insert_event(conn, vm_id, self._clock(), "taken", detail)
            return _get(conn, vm_id)

    def get_vm(self, vm_id: str) -> VMRow | None:
        with self._read() as conn:
            return _find(conn, "id", vm_id)

    def get_vm_by_name(self, name: str) -> VMRow | None:
        with self._read() as conn:
            return _find(conn, "name", name)

    def list_vms(self, *, all: bool = False) -> list[VMRow]:
        """VMs in ACTIVE_STATES, oldest first; with ``all=True`` also stopped and failed ones."""
        query = f"SELECT {_VM_COLUMNS} FROM vms"  # noqa: S608 (a constant column list)
        params: tuple[str, ...] = ()
        if not all:
            query += _WHERE_ACTIVE
            params = _ACTIVE_PARAMS
        query += " ORDER BY created_at, rowid"
        with self._read() as conn:
            return [_vm_row(r) for r in conn.execute(query, params)]

    def update_state(
        self,
        vm_id: str,
        state: VMState,
        *,
        exit_code: int | None = None,
        error: str | None = None,
    ) -> VMRow:
        """Move a VM to ``state`` if ``vmm.state.TRANSITIONS`` allows it; append its event.

        Entering ``running`` sets ``started_at``; entering ``stopped`` or ``failed`` sets
        ``stopped_at``. ``exit_code`` and ``error`` are stored when given (None keeps the old
        value). Raises VMNotFoundError or StateTransitionError; then nothing changes.
        """
        state = VMState(state)
        now = self._clock()
        with self._write() as conn:
            row = _get(conn, vm_id)
            check_transition(vm_id, row.state, state)
            started_at = now if state is VMState.RUNNING else row.started_at
            final = state in (VMState.STOPPED, VMState.FAILED)
            stopped_at = now if final else row.stopped_at
            conn.execute(
                "UPDATE vms SET state = ?, started_at = ?, stopped_at = ?,"
                " exit_code = COALESCE(?, exit_code), error = COALESCE(?, error) WHERE id = ?",
                (state.value, started_at, stopped_at, exit_code, error, vm_id),
            )
            detail: dict[str, Any] = {"from": row.state.value}
            if exit_code is not None:
                detail["exit_code"] = exit_code
            if error is not None:
                detail["error"] = error
            _insert_event(conn, vm_id, now, state.value, detail)
            return _get(conn, vm_id)

    def set_pid(self, vm_id: str, qemu_pid: int | None, qemu_start: int | None) -> None:
        """Record (or, with None, clear) the VM's QEMU pid and that process's start time."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE vms SET qemu_pid = ?, qemu_start = ? WHERE id = ?",
                (qemu_pid, qemu_start, vm_id),
            )
            if cur.rowcount == 0:
                raise _not_found(vm_id)

    def delete_vm(self, vm_id: str) -> None:
        """Remove a stopped or failed VM's row and append its ``removed`` event.

        An active VM is refused (StateTransitionError): its row is the only record of a QEMU
        process that may still run, so stop it (or mark it failed) first.
        """
        now = self._clock()
        with self._write() as conn:
            row = _get(conn, vm_id)
            if row.state in ACTIVE_STATES:
                raise StateTransitionError(
                    f"VM {vm_id} is {row.state.value}; stop it before removing it"
                )
            conn.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
            _insert_event(conn, vm_id, now, "removed", {"name": row.name})

    def reservations(self) -> Reservations:
        """Sum of memory_mib and vcpus, and the count, of the VMs in ACTIVE_STATES."""
        with self._read() as conn:
            return _reservations(conn)

    # -- events ----------------------------------------------------------------------------

    def append_event(
        self, vm_id: str, kind: str, detail: Mapping[str, Any] | None = None
    ) -> EventRow:
        """Append an event (any kind, e.g. ``exec``); ``detail`` must be JSON-serializable."""
        now = self._clock()
        with self._write() as conn:
            event_id = _insert_event(conn, vm_id, now, kind, detail or {})
        return EventRow(event_id, vm_id, now, kind, dict(detail or {}))

    def events_since(
        self, after_id: int = 0, *, vm_id: str | None = None, limit: int = 1000
    ) -> list[EventRow]:
        """Events with ``id > after_id`` in id (= commit) order, at most ``limit``; poll with
        the last id seen to follow them."""
        query = "SELECT id, vm_id, at, kind, detail_json FROM events WHERE id > ?"
        params: tuple[object, ...] = (after_id,)
        if vm_id is not None:
            query += " AND vm_id = ?"
            params += (vm_id,)
        query += " ORDER BY id LIMIT ?"
        params += (limit,)
        with self._read() as conn:
            return [
                EventRow(r["id"], r["vm_id"], r["at"], r["kind"], json.loads(r["detail_json"]))
                for r in conn.execute(query, params)
            ]

    def latest_event_id(self) -> int:
        """The id of the newest event, 0 if none: where a follower that wants only new events
        starts."""
        with self._read() as conn:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction under the lock; rolled back on any exception."""
        with self._lock:
            conn = self._open_conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.rollback()
                raise StoreError(f"state database {self.path}: {exc}") from exc
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, for one statement (autocommit, a consistent read)."""
        with self._lock:
            conn = self._open_conn()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.path}: {exc}") from exc

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the state database {self.path} is closed")
        return self._conn


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    if not path.parent.exists():
        private_dir(path.parent)
    try:
        # Create it 0600 before SQLite does (SQLite gives its -wal and -shm files the same mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise StoreError(f"cannot open the state database {path}: {exc}") from exc
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,  # autocommit: every transaction is an explicit BEGIN ... COMMIT
        check_same_thread=False,  # Store's lock serializes every use of the connection
    )
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if mode.lower() != "wal":
            raise StoreError(
                f"the state database {path} cannot use WAL (journal mode is {mode!r}): "
                "put $WARDEN_HOME on a local filesystem"
            )
        conn.execute("PRAGMA foreign_keys = ON")
        # In WAL mode, NORMAL survives a crash of the process (kill -9); only a power loss can
        # lose the last commits, and that also ends every VM.
        conn.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(
            f"cannot open the state database {path}: {exc}. If it is not a warden state "
            "database, move it away."
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _vm_row(r: sqlite3.Row) -> VMRow:
    return VMRow(
        id=r["id"],
        name=r["name"],
        state=VMState(r["state"]),
        spec_json=r["spec_json"],
        image=r["image"],
        vcpus=r["vcpus"],
        memory_mib=r["memory_mib"],
        labels=json.loads(r["labels_json"]),
        created_at=r["created_at"],
        started_at=r["started_at"],
        stopped_at=r["stopped_at"],
        qemu_pid=r["qemu_pid"],
        qemu_start=r["qemu_start"],
        runtime_dir=Path(r["runtime_dir"]) if r["runtime_dir"] is not None else None,
        exit_code=r["exit_code"],
        error=r["error"],
        owner=r["owner"],
    )


def _find(conn: sqlite3.Connection, column: str, value: str) -> VMRow | None:
    assert column in ("id", "name")
    r = conn.execute(
        f"SELECT {_VM_COLUMNS} FROM vms WHERE {column} = ?",  # noqa: S608 (constant names)
        (value,),
    ).fetchone()
    return _vm_row(r) if r is not None else None


def _get(conn: sqlite3.Connection, vm_id: str) -> VMRow:
    row = _find(conn, "id", vm_id)
    if row is None:
        raise _not_found(vm_id)
    return row


def _insert_vm(
    conn: sqlite3.Connection,
    vm_id: str,
    spec: VMSpec,
    now: float,
    runtime_dir: Path | None,
    owner: str,
) -> None:
    """Insert the row of a VM in state ``creating``. Raises NameConflictError if its name is
    taken, StoreError if its id is."""
    try:
        conn.execute(
            f"INSERT INTO vms ({_VM_COLUMNS})"  # noqa: S608 (a constant column list)
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, ?, NULL, NULL, ?)",
            (
                vm_id,
                spec.name,
                VMState.CREATING.value,
                spec.model_dump_json(),
                spec.image,
                spec.vcpus,
                spec.memory_mib,
                json.dumps(spec.labels, sort_keys=True),
                now,
                str(runtime_dir) if runtime_dir is not None else None,
                owner,
            ),
        )
    except sqlite3.IntegrityError as exc:
        if "vms.name" in str(exc) and spec.name is not None:
            raise _name_conflict(spec.name) from None
        raise StoreError(f"a VM with id {vm_id!r} exists already") from exc


def _created_details(spec: VMSpec, owner: str) -> dict[str, object]:
    """What a VM's ``created`` event records."""
    return {
        "name": spec.name,
        "image": spec.image,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "owner": owner,
    }


def _name_taken(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone() is not None


def _reservations(conn: sqlite3.Connection) -> Reservations:
    active = tuple(
        ActiveVM(str(r[0]), int(r[1]), int(r[2]), str(r[3]))
        for r in conn.execute(
            "SELECT id, memory_mib, vcpus, state FROM vms"  # noqa: S608
            + _WHERE_ACTIVE  # a constant: placeholders only
            + " ORDER BY created_at, rowid",
            _ACTIVE_PARAMS,
        )
    )
    return Reservations(
        memory_mib=sum(vm.memory_mib for vm in active),
        vcpus=sum(vm.vcpus for vm in active),
        vms=len(active),
        active=active,
    )


def _insert_event(
    conn: sqlite3.Connection, vm_id: str, at: float, kind: str, detail: Mapping[str, Any]
) -> int:
    cur = conn.execute(
        "INSERT INTO events (vm_id, at, kind, detail_json) VALUES (?, ?, ?, ?)",
        (vm_id, at, kind, json.dumps(dict(detail), separators=(",", ":"), sort_keys=True)),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _name_conflict(name: str) -> NameConflictError:
    return NameConflictError(
        f"a VM named {name!r} exists already: choose another name, or remove that VM first"
    )


def _not_found(vm_id: str) -> VMNotFoundError:
    return VMNotFoundError(f"no VM has id {vm_id!r}; `warden ps --all` lists them")
