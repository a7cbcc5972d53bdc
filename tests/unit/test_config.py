"""The data dir's helpers make everything root-only: dirs 0700, files 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from warden.config import open_private, private_dir, restrict, write_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_private_dir_makes_missing_parents_0700_and_tightens_the_target(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        made = private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "b", made):
        assert _mode(path) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)  # noqa: S103 (the old, loose mode to tighten)
    private_dir(loose)
    assert _mode(loose) == 0o700
    before = _mode(tmp_path)
    private_dir(tmp_path / "x")
    assert _mode(tmp_path) == before


def test_write_private_is_0600_and_atomic(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left


def test_open_private_creates_0600_and_tightens_an_old_file(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    os.close(open_private(fresh, os.O_RDWR | os.O_CREAT))
    assert _mode(fresh) == 0o600
    old = tmp_path / "old.lock"
    old.write_text("")
    os.chmod(old, 0o644)
    os.close(open_private(old, os.O_RDWR | os.O_CREAT))
    assert _mode(old) == 0o600


def test_restrict_leaves_a_guest_tree_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "root" / "etc").mkdir(parents=True)
    os.chmod(out, 0o755)  # noqa: S103 (as mmdebstrap leaves it)
    os.chmod(out / "root", 0o755)  # noqa: S103 (a guest root)
    (out / "artifact").write_bytes(b"x")
    os.chmod(out / "artifact", 0o644)
    (out / "root" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(out / "root" / "etc" / "passwd", 0o644)
    restrict(out)
    assert _mode(out) == 0o700
    assert _mode(out / "artifact") == 0o600
    assert _mode(out / "root") == 0o755  # the guest's own modes: copied into the squashfs
    assert _mode(out / "root" / "etc" / "passwd") == 0o644


def test_private_dir_keeps_only_a_group_pass_bit(tmp_path: Path) -> None:
    """$WARDEN_HOME opened to the daemon's group (0710: pass, not list) stays so; anything
    looser is tightened to 0700."""
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o710)  # noqa: S103 - what warden serve makes of it for its group
    private_dir(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o710
    for loose in (0o750, 0o711, 0o770):
        os.chmod(home, loose)
        private_dir(home)
        assert stat.S_IMODE(home.stat().st_mode) == 0o700, oct(loose)
