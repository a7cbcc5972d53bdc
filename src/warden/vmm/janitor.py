"""Entry point of the per-owner janitor process (see :mod:`warden.vmm.ownership`)."""

from __future__ import annotations

import sys

from warden.vmm.ownership import _janitor_main

if __name__ == "__main__":
    sys.exit(_janitor_main(sys.argv[1:]))
