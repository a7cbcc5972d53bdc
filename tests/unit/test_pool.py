"""The warm pool's pure parts: its sizes, and the store's hand-over of a member to a create."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from warden._errors import NameConflictError, VMNotFoundError
from warden.server.pool import DEFAULT_SIZE, DEFAULT_TEMPLATE, POOL_LABEL, WarmPool, parse_sizes
from warden.store import Store
from warden.vmm.spec import VMSpec


def test_sizes_default_to_the_default_template() -> None:
    assert parse_sizes([]) == {DEFAULT_TEMPLATE: DEFAULT_SIZE}
    assert parse_sizes(["py=4"]) == {DEFAULT_TEMPLATE: DEFAULT_SIZE, "py": 4}
    assert parse_sizes(["default=0", "py=1"]) == {"py": 1}


@pytest.mark.parametrize("bad", ["py", "py=", "=3", "py=-1", "Py=2", "py=x", "py=513"])
def test_bad_sizes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="NAME=K"):
        parse_sizes([bad])


async def _never(spec: VMSpec) -> object:
    raise AssertionError("no launch expected")


async def test_only_plain_creates_of_a_pooled_template_are_served() -> None:
    pool = WarmPool({"py": 2}, _never)  # type: ignore[arg-type]
    assert pool.serves(VMSpec(template="py"))
    assert pool.serves(VMSpec(template="py", name="mine", labels={"a": "b"}))
    assert not pool.serves(VMSpec(template="other"))
    assert not pool.serves(VMSpec())
    assert not pool.serves(VMSpec(template="py", accel="tcg"))
    assert not pool.serves(VMSpec(template="py", labels={POOL_LABEL: "py"}))
    assert pool.take("py") is None  # nothing ready


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


def test_hand_over_gives_a_member_the_creates_name_and_labels(store: Store) -> None:
    store.create_vm("m1", VMSpec(template="py", labels={POOL_LABEL: "py"}))
    store.create_vm("other", VMSpec(name="taken"))
    row = store.hand_over("m1", VMSpec(template="py", name="mine", labels={"team": "a"}))
    assert row.name == "mine" and row.labels == {"team": "a"}
    assert row.spec().template == "py" and POOL_LABEL not in row.spec().labels
    assert [e.kind for e in store.events_since(0) if e.vm_id == "m1"][-1] == "taken"
    with pytest.raises(NameConflictError):
        store.hand_over("m1", VMSpec(template="py", name="taken"))
    assert store.get_vm("m1").name == "mine"  # type: ignore[union-attr]
    with pytest.raises(VMNotFoundError):
        store.hand_over("gone", VMSpec(template="py"))
