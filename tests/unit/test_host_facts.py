"""Host facts (``seal/facts.py``): learnt once, remembered under the stat of the files they
were learnt from, learnt again when one of those changes or is gone."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from warden.seal import facts
from warden.seal.facts import HostFacts


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "qemu"
    path.write_bytes(b"version 1")
    old = 1_000_000_000
    os.utime(path, (old, old))  # mtime long ago (the ctime is now: see RACY_NS below)
    return path


def _learner(path: Path, calls: list[str]) -> tuple[Callable[[], str], Callable[[str], list[str]]]:
    def learn() -> str:
        calls.append("learnt")
        return path.read_text()

    return learn, lambda _: [str(path)]


def test_a_fact_is_learnt_once_while_its_file_is_unchanged(
    tmp_path: Path, binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(facts, "RACY_NS", 0)
    calls: list[str] = []
    learn, files = _learner(binary, calls)
    store = HostFacts(tmp_path / "cache")
    assert store.get("v", learn, files) == "version 1"
    assert HostFacts(tmp_path / "cache").get("v", learn, files) == "version 1"
    assert calls == ["learnt"], "a new process should have found it remembered"
    assert (tmp_path / "cache" / facts.RECORD_NAME).stat().st_mode & 0o777 == 0o600
    binary.write_bytes(b"version 2")  # same size, new ctime
    assert store.get("v", learn, files) == "version 2"
    binary.unlink()
    binary.write_bytes(b"version 3")  # a new inode, as a package upgrade's rename gives
    assert store.get("v", learn, files) == "version 3"
    assert calls == ["learnt"] * 3


def test_a_fact_learnt_right_after_its_file_changed_is_not_remembered(
    tmp_path: Path, binary: Path
) -> None:
    """The ctime was just set (by the fixture's write): within RACY_NS nothing is remembered,
    as a write in the same clock tick could leave the stat unchanged."""
    calls: list[str] = []
    learn, files = _learner(binary, calls)
    store = HostFacts(tmp_path / "cache")
    store.get("v", learn, files)
    store.get("v", learn, files)
    assert calls == ["learnt", "learnt"]


def test_a_corrupt_record_counts_as_empty(tmp_path: Path, binary: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / facts.RECORD_NAME).write_text("{not json")
    calls: list[str] = []
    learn, files = _learner(binary, calls)
    assert HostFacts(tmp_path / "cache").get("v", learn, files) == "version 1"
    assert calls == ["learnt"]
