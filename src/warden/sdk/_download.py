"""Copying a file out of a guest onto the host's disk: bounded, sparse, and never half there.

The guest is hostile, so what it sends is written under three rules:

* **A maximum size** (``max_size``): the guest's own size is checked first (a refusal before
  any transfer), then every byte as it comes, since the file may grow or be endless
  (``/dev/zero``). Passing it raises :class:`~warden.SizeLimitError`.
* **Holes for zero runs**: a run of :data:`HOLE_BLOCK` zero bytes is skipped, not written, so
  a sparse guest file stays sparse (and a stream of zeros costs no disk).
* **No partial file**: the data goes into an anonymous file (``O_TMPFILE``) in the target's
  directory, which gets its name only once it is complete. A failure, Ctrl-C, SIGTERM or even
  SIGKILL leaves nothing. Where the file system has no ``O_TMPFILE``, a ``.part`` file beside
  the target is used instead and removed on every failure the process lives through.

The file is made with mode 0600: its content came from the guest, and is the user's alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator

from warden._errors import SizeLimitError

HOLE_BLOCK = 64 * 1024
"""Zero runs of this size (at this alignment within each chunk) become holes."""
_ZEROS = bytes(HOLE_BLOCK)
DEFAULT_MAX_DOWNLOAD = 1 << 30
"""The default ``max_size`` of ``files.download`` and ``warden cp`` (1 GiB)."""
FILE_MODE = 0o600


def too_large(path: str, size: int, max_size: int) -> SizeLimitError:
    return SizeLimitError(
        f"{path} in the sandbox is larger than max_size={max_size} bytes (it has {size} or "
        "more); pass a larger max_size, or None for no limit (warden cp: --max-size, 0 for "
        "no limit)"
    )


async def bounded(
    chunks: AsyncIterator[bytes], path: str, max_size: int | None
) -> AsyncIterator[bytes]:
    """``chunks``, raising SizeLimitError before yielding a byte past ``max_size``.
    Closes ``chunks`` (which stops the transfer) when it stops early."""
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if max_size is not None and total > max_size:
                raise too_large(path, total, max_size)
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class PartFile:
    """A download to ``dest``: invisible (or a ``.part``) until :meth:`commit`, gone on
    :meth:`discard`. Data is written with holes for zero runs."""

    def __init__(self, dest: str) -> None:
        self.dest = os.path.abspath(dest)
        self.size = 0
        folder, name = os.path.split(self.dest)
        self.part: str | None = None
        try:
            self.fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self.part = os.path.join(folder, f".{name}.warden-{os.getpid()}.part")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self.fd = os.open(self.part, flags, FILE_MODE)

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``, skipping (leaving a hole for) each all-zero block of it."""
        start: int | None = None  # where the pending run of data began in chunk
        for i in range(0, len(chunk), HOLE_BLOCK):
            block = chunk[i : i + HOLE_BLOCK]
            if block == _ZEROS[: len(block)]:
                if start is not None:
                    self._pwrite(chunk[start:i], start)
                    start = None
            elif start is None:
                start = i
        if start is not None:
            self._pwrite(chunk[start:], start)
        self.size += len(chunk)

    def _pwrite(self, data: bytes, start: int) -> None:
        view = memoryview(data)
        offset = self.size + start
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def commit(self) -> None:
        """Give the complete file its name (replacing what had it)."""
        os.ftruncate(self.fd, self.size)  # a trailing hole still counts
        if self.part is not None:
            os.replace(self.part, self.dest)
            self.part = None
        else:
            self._link()
        os.close(self.fd)
        self.fd = -1

    def _link(self) -> None:
        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names an O_TMPFILE file; os.link uses
        # linkat only when given a dir fd, so it gets the /proc/self/fd dir.
        proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.link(str(self.fd), self.dest, src_dir_fd=proc, follow_symlinks=True)
                return
            except FileExistsError:
                pass
            folder, name = os.path.split(self.dest)
            temp = os.path.join(folder, f".{name}.warden-{os.getpid()}.new")
            os.link(str(self.fd), temp, src_dir_fd=proc, follow_symlinks=True)
            try:
                os.replace(temp, self.dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        finally:
            os.close(proc)

    def discard(self) -> None:
        """Drop what was written (nothing to do for an anonymous file but close it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.part is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.part)
            self.part = None


async def download(chunks: AsyncIterator[bytes], path: str, dest: str, max_size: int | None) -> int:
    """Write ``chunks`` (the guest file ``path``) to ``dest``; returns the size. On any error
    or cancellation nothing is left at ``dest`` or beside it."""
    part = PartFile(dest)
    try:
        async for chunk in bounded(chunks, path, max_size):
            part.write(chunk)
        part.commit()
    except BaseException:
        part.discard()
        raise
    return part.size
