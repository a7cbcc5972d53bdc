"""OpenSSL's scalar code under TCG: set up before anything loads libcrypto.

OpenSSL reads ``OPENSSL_ia32cap`` once, when libcrypto is loaded, and the agent loads it
early: ``hashlib`` (which the channel's Noise code imports) is linked to it. So the agent's
entry script calls :func:`prefer_scalar_code` before it imports anything else of the agent.
Under TCG the host puts ``warden.crypto=scalar`` on the kernel command line (``vmm/argv.py``);
then the mask below hides SSSE3, AVX and AVX2 from OpenSSL, whose scalar ChaCha20 and Poly1305
TCG runs 2-3x faster than the SIMD code it emulates one instruction at a time (measured in a
guest: ChaCha20-Poly1305 at about 110 MB/s against about 45 MB/s). The agent removes the
variable once libcrypto is loaded (``pid1.load_crypto``): commands never see it.

Standard library only (``os``), and no import of the rest of the agent.
"""

from __future__ import annotations

import os

SCALAR_CRYPTO = "~0x1000020000000000:~0x20"
"""OPENSSL_ia32cap: the CPUID leaf 1 bits of SSSE3 (ECX 9) and AVX (ECX 28), and the leaf 7
bit of AVX2 (EBX 5), cleared."""
VARIABLE = "OPENSSL_ia32cap"


def prefer_scalar_code(cmdline: str = "/proc/cmdline") -> bool:
    """Set the mask if the kernel command line asks for it; whether it did."""
    try:
        with open(cmdline, encoding="ascii", errors="replace") as f:
            words = f.read().split()
    except OSError:
        return False
    if "warden.crypto=scalar" not in words:
        return False
    os.environ[VARIABLE] = SCALAR_CRYPTO
    return True
