"""The quick file operations, answered inline: stat, list, remove, mkdir."""

from __future__ import annotations

import os

from warden.guest.args import arg_bool, arg_mode, arg_path
from warden.wire.ops import Key, Op

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def load(op: str) -> None:
    """Import, as root, what ``op`` imports lazily: not while acting as the user, who may not
    read the agent's Python (on a test host)."""
    if op == Op.REMOVE:
        import shutil

        del shutil


def entry(path: str, name: str, st: os.stat_result) -> dict[str, Any]:
    import stat

    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    return {
        "name": name,
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": st.st_mtime,
    }


def op_stat(args: dict[str, Any]) -> dict[str, Any]:
    path = arg_path(args)
    st = os.lstat(path)
    name = os.path.basename(path.rstrip("/")) or "/"
    return {Key.ENTRY: entry(path, name, st)}


def op_list(args: dict[str, Any]) -> dict[str, Any]:
    path = arg_path(args)
    entries = []
    with os.scandir(path) as it:
        for item in it:
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while listing
            entries.append(entry(os.path.join(path, item.name), item.name, st))
    entries.sort(key=lambda e: str(e["name"]))
    return {Key.ENTRIES: entries}


def op_remove(args: dict[str, Any]) -> dict[str, Any]:
    import stat

    path = arg_path(args)
    recursive = arg_bool(args, Key.RECURSIVE, False)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if recursive:
            import shutil

            shutil.rmtree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    return {}


def op_mkdir(args: dict[str, Any]) -> dict[str, Any]:
    path = arg_path(args)
    parents = arg_bool(args, Key.PARENTS, False)
    mode = arg_mode(args, 0o755)
    if parents:
        os.makedirs(path, mode=mode, exist_ok=True)
        if not os.path.isdir(path):
            raise FileExistsError(17, "File exists", path)
    else:
        os.mkdir(path, mode)
    return {}
