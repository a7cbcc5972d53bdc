"""VMSpec refuses a memory size the guest cannot boot in, and names the measured minimum."""

from __future__ import annotations

import pytest

from warden._errors import SpecError
from warden.vmm.spec import MIN_MEMORY_MIB, VMSpec


@pytest.mark.parametrize("memory", [-1, 0, 1, 64, MIN_MEMORY_MIB - 1])
def test_too_little_memory_is_refused_naming_the_minimum(memory: int) -> None:
    with pytest.raises(SpecError) as info:
        VMSpec.parse(memory_mib=memory, check_host=False)
    message = str(info.value)
    assert "memory_mib" in message
    assert f"minimum of {MIN_MEMORY_MIB} MiB" in message
    assert f"set memory_mib to {MIN_MEMORY_MIB} or more" in message


def test_the_minimum_itself_is_accepted() -> None:
    spec = VMSpec.parse(memory_mib=MIN_MEMORY_MIB, check_host=False)
    assert spec.memory_mib == MIN_MEMORY_MIB


def test_the_minimum_leaves_a_margin_over_what_was_measured() -> None:
    # 64 MiB panics the guest kernel and 80 MiB hangs the agent (see spec.MIN_MEMORY_MIB).
    assert MIN_MEMORY_MIB > 80


def test_the_default_is_above_the_minimum() -> None:
    assert VMSpec().memory_mib >= MIN_MEMORY_MIB


def test_the_schema_states_the_minimum() -> None:
    schema = VMSpec.model_json_schema()
    assert schema["properties"]["memory_mib"]["minimum"] == MIN_MEMORY_MIB
