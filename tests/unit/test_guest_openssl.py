"""The agent's OpenSSL mask under TCG (``warden.guest.openssl``), and that it is set before
anything of the agent can load libcrypto."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warden.agent import bundle
from warden.guest import openssl


def test_the_mask_is_set_only_when_the_command_line_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(openssl.VARIABLE, raising=False)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 warden.mode=agent\n")
    assert not openssl.prefer_scalar_code(str(cmdline))
    assert openssl.VARIABLE not in os.environ
    cmdline.write_text("console=ttyS0 warden.mode=agent warden.crypto=scalar\n")
    assert openssl.prefer_scalar_code(str(cmdline))
    assert os.environ[openssl.VARIABLE] == openssl.SCALAR_CRYPTO
    assert not openssl.prefer_scalar_code(str(tmp_path / "none"))


def test_the_entry_script_sets_the_mask_before_it_imports_the_agent() -> None:
    """OpenSSL reads the mask once, when libcrypto loads, and ``hashlib`` (imported by the
    agent's channel code) loads it: the mask must come first."""
    main = bundle.guest_files()[f"{bundle.GUEST_ROOT}/agent_main.py"].decode()
    assert main.index("prefer_scalar_code()") < main.index(f"from {bundle.AGENT_MODULE}")
    source = Path(openssl.__file__).read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations", "import os"]
