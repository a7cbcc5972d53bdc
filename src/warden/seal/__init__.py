"""Host secrets and seals: what warden stores and later trusts is authenticated first.

* ``keys.py``: named 32-byte secrets in 0600 files under ``$WARDEN_HOME/keys/`` (the host's
  sealing key; per-VM secrets can live there too).
* ``mac.py``: seal a JSON record with a host key (HMAC-SHA256), verify it before use.
* ``digests.py``: the SHA-256 of a file, hashed once and remembered by its stat in a
  root-only record, so an unchanged file is not read again by every process.
"""

from warden.seal.digests import DigestRecord, sha256_fd
from warden.seal.keys import KEY_BYTES, KeyStore, KeyStoreError
from warden.seal.mac import Sealer, SealRefused, canonical_json

__all__ = [
    "KEY_BYTES",
    "DigestRecord",
    "KeyStore",
    "KeyStoreError",
    "SealRefused",
    "Sealer",
    "canonical_json",
    "sha256_fd",
]
