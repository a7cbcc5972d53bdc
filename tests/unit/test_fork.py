"""What ``Machine.fork`` refuses before it pauses anything (``vmm/fork.py``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from warden._errors import SpecError, TemplateError
from warden.vmm.fork import MAX_CHILDREN, check_forkable
from warden.vmm.spec import VMSpec


def _vm(booted_from: str = "template", **spec: Any) -> Any:
    return SimpleNamespace(id="abc", booted_from=booted_from, spec=VMSpec(**spec))


@pytest.mark.parametrize("n", [0, -1, MAX_CHILDREN + 1, True, 1.0, "2"])
def test_a_bad_count_is_refused(n: Any) -> None:
    with pytest.raises(SpecError, match=f"a fork makes 1 to {MAX_CHILDREN} children"):
        check_forkable(_vm(), n)


@pytest.mark.parametrize("n", [1, MAX_CHILDREN])
@pytest.mark.parametrize("booted_from", ["cold", "template"])
def test_a_vm_booted_cold_or_cloned_can_be_forked(n: int, booted_from: str) -> None:
    """A clone (of the automatic boot template: every default VM) too: its RAM is copied as
    its template's plus its own pages (memfd.copy_qemu_ram)."""
    check_forkable(_vm(booted_from), n)


def test_ram_in_a_file_cannot_be_forked() -> None:
    with pytest.raises(TemplateError, match="memory_backend='file'"):
        check_forkable(_vm(memory_backend="file"), 1)
