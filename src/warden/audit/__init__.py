"""The tamper-evident audit log (issue 9): who did what, chained with HMAC-SHA256, signed at
checkpoints with Ed25519, durable before an append returns.

- :class:`AuditLog` (``log.py``) writes it: ``AuditLog.open(home).append(action, principal=...)``.
- :func:`verify` (``verify.py``) finds and places every modified, deleted, inserted,
  reordered or truncated record, a torn tail, a bad checkpoint or a wrong key.
- :func:`records` and :func:`follow` (``read.py``) read it, for ``warden audit tail|search``.

Layout, format and keys: ``_format.py``; threat model: docs/security.md, "Audit log".

In a daemon (one writer per ``$WARDEN_HOME``; appends from any thread or task)::

    log = AuditLog.open(paths.home)                      # at start; log.close() at shutdown
    await log.append_async("exec", principal=p.name, sandbox=vm_id,
                           argv_sha256=argv_digest(argv), user=user,
                           exit_code=rc, duration_s=round(elapsed, 3))
    await log.append_async("files-write", principal=p.name, sandbox=vm_id, path=path,
                           size=n, sha256=digest, direction="in")
    await log.append_async("exec", principal=p.name, sandbox=vm_id, outcome="denied",
                           reason=decision.reason, rule=decision.rule)

``append`` returns once the record is on disk; an ``AuditLogError`` means it is not, and the
request it records should fail rather than go unrecorded.
"""

from __future__ import annotations

from warden.audit._format import MAX_RECORD_BYTES, argv_digest, log_path
from warden.audit.log import AuditLog
from warden.audit.read import follow, parse_since, records
from warden.audit.verify import Problem, VerifyReport, verify

__all__ = [
    "MAX_RECORD_BYTES",
    "AuditLog",
    "Problem",
    "VerifyReport",
    "argv_digest",
    "follow",
    "log_path",
    "parse_since",
    "records",
    "verify",
]
