"""Templates through the SDK, embedded and against a daemon: save a sandbox as a template,
create clones of it, list and remove it; bad input refused with the documented errors and
nothing left behind. (Clone internals, seals and tampering: test_templates.py and
tests/security/test_template_seal.py.)"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warden import SpecError, TemplateNotFoundError
from warden._errors import NameConflictError
from warden.config import Paths
from warden.vmm.templates import Templates

from ..conftest import qemu_pids, runtime_dirs
from .conftest import is_remote

pytestmark = pytest.mark.vm

WARDEN = str(Path(sys.executable).parent / "warden")


@pytest.fixture
def template_name() -> Iterator[str]:
    """A fresh template name, removed afterwards whatever happened."""
    name = f"t-{secrets.token_hex(4)}"
    yield name
    store = Templates(Paths.from_env())
    if store.exists(name):
        store.remove(name)


def _templates(sdk: Any) -> list[dict[str, Any]]:
    if is_remote(sdk):
        return list(sdk.templates())
    import dataclasses

    return [dataclasses.asdict(t) for t in Templates(Paths.from_env()).list()]


def test_a_saved_sandbox_is_cloned_with_its_state(sdk: Any, template_name: str) -> None:
    with sdk.Sandbox.create(memory_mib=256) as src:
        src.commands.run("echo from-the-template > /home/user/mark")
        src.save_template(template_name)
        # The source keeps running, with its files.
        assert src.commands.run("cat /home/user/mark").stdout == "from-the-template\n"
        source_id = src.id
    listed = {t["name"]: t for t in _templates(sdk)}
    assert listed[template_name]["source"] == source_id
    assert listed[template_name]["memory_mib"] == 256 and listed[template_name]["problem"] is None
    with (
        sdk.Sandbox.create(template=template_name) as a,
        sdk.Sandbox.create(template=template_name) as b,
    ):
        for clone in (a, b):
            assert clone.commands.run("cat /home/user/mark").stdout == "from-the-template\n"
        a.commands.run("echo a > /home/user/mark")
        assert b.commands.run("cat /home/user/mark").stdout == "from-the-template\n"
        names = {c.commands.run("hostname").stdout.strip() for c in (a, b)}
        assert names == {a.id, b.id}


def test_a_clone_has_its_templates_memory(sdk: Any, template_name: str) -> None:
    with sdk.Sandbox.create(memory_mib=384) as src:
        src.save_template(template_name)
    with sdk.Sandbox.create(template=template_name) as clone:
        kib = int(clone.commands.run("grep MemTotal /proc/meminfo").stdout.split()[1])
        assert 300 * 1024 < kib <= 384 * 1024
    with pytest.raises(SpecError, match="template's memory_mib"):
        sdk.Sandbox.create(template=template_name, memory_mib=512)


def test_unknown_or_duplicate_template_names_are_refused(
    sdk: Any, template_name: str, no_leaks: None
) -> None:
    pids, dirs = qemu_pids(), runtime_dirs()  # (no_leaks checks again at the end)
    with pytest.raises(TemplateNotFoundError, match="warden template list"):
        sdk.Sandbox.create(template="no-such-template")
    with pytest.raises(SpecError, match="template name"):
        sdk.Sandbox.create(template="Not_Valid!")
    assert qemu_pids() == pids and runtime_dirs() == dirs
    with sdk.Sandbox.create() as src:
        src.save_template(template_name)
        with pytest.raises(NameConflictError, match="exists already"):
            src.save_template(template_name)
        assert src.commands.run("true").exit_code == 0  # still serving
    remove = sdk.remove_template if is_remote(sdk) else Templates(Paths.from_env()).remove
    remove(template_name)
    with pytest.raises(TemplateNotFoundError):
        remove(template_name)
    assert template_name not in {t["name"] for t in _templates(sdk)}


def test_cli_template_create_run_and_rm(template_name: str, tmp_path: Path) -> None:
    # No daemon answers on the default socket here: the CLI works on this host's store.
    made = subprocess.run(
        [WARDEN, "template", "create", template_name, "--run", "echo ready > /home/user/r"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    ran = subprocess.run(
        [WARDEN, "run", "--template", template_name, "--", "cat", "/home/user/r"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert ran.returncode == 0 and ran.stdout == "ready\n", ran.stderr
    failed = subprocess.run(
        [WARDEN, "template", "create", f"{template_name}x", "--run", "exit 3"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert failed.returncode != 0 and "exited with 3" in failed.stdout + failed.stderr
    assert not Templates(Paths.from_env()).exists(f"{template_name}x")
    removed = subprocess.run(
        [WARDEN, "template", "rm", template_name],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert removed.returncode == 0, removed.stderr
    assert not Templates(Paths.from_env()).exists(template_name)


def test_fork_children_carry_on_from_the_parent(sdk: Any, no_leaks: None) -> None:
    with sdk.Sandbox.create() as parent:
        parent.commands.run("echo from-parent > /home/user/f")
        children = parent.fork(2)
        try:
            assert len({c.id for c in children} | {parent.id}) == 3
            for child in children:
                assert child.commands.run("cat /home/user/f").stdout == "from-parent\n"
                assert child.commands.run("hostname").stdout.strip() == child.id
            children[0].commands.run("echo changed > /home/user/f")
            assert children[1].commands.run("cat /home/user/f").stdout == "from-parent\n"
            assert parent.commands.run("cat /home/user/f").stdout == "from-parent\n"
            [grandchild] = children[0].fork(1)  # a clone forks too
            try:
                assert grandchild.commands.run("cat /home/user/f").stdout == "changed\n"
            finally:
                grandchild.kill()
        finally:
            for child in children:
                child.kill()
        assert parent.commands.run("true").exit_code == 0
