"""The guest root filesystem: a Debian tree from mmdebstrap, plus the agent, as squashfs.

Two stages, cached apart so that changing only the agent does not rerun mmdebstrap:

* :func:`build_base` runs mmdebstrap with the host's own apt sources and trims the tree
  (docs, man pages, locales, apt lists, host files that mmdebstrap copied in).
* :func:`build_rootfs` hard-links a copy of that tree, adds the workload's account ``user``
  (:func:`add_user`), strips every setuid and setgid bit (:func:`strip_setid`), writes the agent
  files, compiles them with the guest's Python (the read-only root never needs to write a
  .pyc), and packs it all with mksquashfs, keeping the tree's owners (root, but ``/home/user``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from warden._errors import HostError, ImageBuildError
from warden.agent import bundle
from warden.image import tools
from warden.wire.ops import USER_GID, USER_HOME, USER_UID, User

APT_SOURCE_DIR = Path("/etc/apt")
SQUASHFS_LEVEL = 6
"""zstd level: the squashfs is ~10% larger than at the default 15 but packs ~5x faster, and
reads in the guest just as fast."""
AGENT_MTIME = 1_700_000_000
"""Fixed mtime of the agent files, so the same agent gives the same squashfs."""
GUEST_HOSTNAME = "warden"

TRIM_GLOBS = (
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "usr/share/lintian/*",
    "usr/share/linda/*",
    "var/cache/apt/*",
    "var/cache/debconf/*-old",
    "var/lib/apt/lists/*",
    "var/log/*",
    "etc/resolv.conf",
)
"""Removed from the base tree. ``usr/share/doc`` keeps only the copyright files."""


# -- the host's apt sources ----------------------------------------------------------------------


@dataclass
class AptSource:
    """One apt source entry, as in a deb822 ``.sources`` stanza."""

    types: list[str]
    uris: list[str]
    suites: list[str]
    components: list[str]
    options: dict[str, str] = field(default_factory=dict)

    def deb822(self) -> str:
        lines = [
            f"Types: {' '.join(self.types)}",
            f"URIs: {' '.join(self.uris)}",
            f"Suites: {' '.join(self.suites)}",
            f"Components: {' '.join(self.components)}",
        ]
        lines += [f"{k}: {v}" for k, v in sorted(self.options.items())]
        return "\n".join(lines) + "\n"


_ONE_LINE_OPTIONS = {
    "arch": "Architectures",
    "signed-by": "Signed-By",
    "trusted": "Trusted",
    "lang": "Languages",
    "target": "Targets",
}


def parse_one_line_sources(text: str) -> list[AptSource]:
    """Parse a ``sources.list`` in the one-line format."""
    out: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        options: dict[str, str] = {}
        m = re.match(r"^(\S+)\s+\[([^\]]*)\]\s+(.*)$", line)
        if m:
            kind, opts, rest = m.groups()
            for opt in opts.split():
                key, _, value = opt.partition("=")
                options[_ONE_LINE_OPTIONS.get(key, key)] = value
        else:
            kind, _, rest = line.partition(" ")
        parts = rest.split()
        if len(parts) < 2:
            continue
        out.append(AptSource([kind], [parts[0]], [parts[1]], parts[2:], options))
    return out


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Parse a deb822 ``.sources`` file (comment lines are dropped)."""
    out: list[AptSource] = []
    stanzas = re.split(r"\n\s*\n", "\n".join(ln for ln in text.splitlines() if ln[:1] != "#"))
    for stanza in stanzas:
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip()
                fields[key] = value.strip()
        if not fields or fields.get("Enabled", "yes").lower() == "no":
            continue
        known = {"Types", "URIs", "Suites", "Components", "Enabled"}
        options = {k: v for k, v in fields.items() if k not in known}
        out.append(
            AptSource(
                fields.get("Types", "").split(),
                fields.get("URIs", "").split(),
                fields.get("Suites", "").split(),
                fields.get("Components", "").split(),
                options,
            )
        )
    return out


def host_sources_for(suite: str, etc_apt: Path = APT_SOURCE_DIR) -> list[AptSource]:
    """The host's binary apt sources for ``suite`` and its ``suite-*`` companions.

    Reads ``sources.list`` and ``sources.list.d/*.list``/``*.sources`` as apt does (other
    file names are ignored by apt, and so here). Sources of other suites (third-party
    repositories) are left out.
    """
    files: list[Path] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        files.append(main)
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    keep: list[AptSource] = []
    for path in files:
        text = path.read_text(errors="replace")
        entries = (
            parse_deb822_sources(text)
            if path.suffix == ".sources"
            else parse_one_line_sources(text)
        )
        for src in entries:
            suites = [s for s in src.suites if s == suite or s.startswith(suite + "-")]
            if "deb" in src.types and suites and src.uris and src.components:
                keep.append(AptSource(["deb"], src.uris, suites, src.components, src.options))
    return keep


def write_sources_file(suite: str, dest: Path) -> Path:
    """Write the host's sources for ``suite`` as one deb822 file for mmdebstrap."""
    sources = host_sources_for(suite)
    if not sources:
        raise HostError(
            f"the host's apt sources ({APT_SOURCE_DIR}/sources.list*) have no 'deb' entry for "
            f"suite {suite!r}; add one, run `apt-get update`, and build again"
        )
    dest.write_text("\n".join(s.deb822() for s in sources))
    return dest


# -- base tree -----------------------------------------------------------------------------------


def mmdebstrap_argv(suite: str, packages: Sequence[str], target: Path, sources: Path) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=essential",
        "--mode=root",
        "--format=directory",
        "--include=" + ",".join(sorted(set(packages))),
        suite,
        str(target),
        str(sources),
    ]


def build_base(root: Path, suite: str, packages: Sequence[str], workdir: Path) -> None:
    """mmdebstrap ``suite`` with ``packages`` into ``root`` (must not exist) and trim it."""
    sources = write_sources_file(suite, workdir / "host.sources")
    tools.run(
        "mmdebstrap",
        mmdebstrap_argv(suite, packages, root, sources),
        hint="check that apt works on the host (`apt-get update`) and that the packages exist",
        timeout=3600,
    )
    trim_tree(root)
    finish_tree(root)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def trim_tree(root: Path, globs: Iterable[str] = TRIM_GLOBS) -> None:
    """Remove what the guest never reads: docs (but copyrights), man pages, locales, caches."""
    for pattern in globs:
        for path in root.glob(pattern):
            _remove(path)
    doc = root / "usr/share/doc"
    if doc.is_dir():
        for pkg in doc.iterdir():
            if pkg.is_dir() and not pkg.is_symlink():
                for item in pkg.iterdir():
                    if item.name != "copyright":
                        _remove(item)


def finish_tree(root: Path) -> None:
    """Make the tree fit to be a read-only guest root: fixed hostname, /tmp 1777, /root."""
    (root / "etc/hostname").write_text(GUEST_HOSTNAME + "\n")
    for name, mode in (("tmp", 0o1777), ("root", 0o700), ("dev", 0o755), ("proc", 0o555)):
        d = root / name
        d.mkdir(exist_ok=True)
        d.chmod(mode)
    (root / "sys").mkdir(exist_ok=True)


# -- rootfs --------------------------------------------------------------------------------------


def link_copy(base: Path, dest: Path) -> None:
    """Copy the tree ``base`` to ``dest`` with hard links (fast; files must not be edited)."""
    tools.run("copy base", ["cp", "-a", "-l", str(base), str(dest)])


def write_agent(root: Path, files: Mapping[str, bytes]) -> None:
    """Write the agent files under ``root`` (never through a hard link into the base)."""
    for rel, data in sorted(files.items()):
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ImageBuildError("agent files", None, f"    bad agent path {rel!r}")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
        os.utime(path, (AGENT_MTIME, AGENT_MTIME))


AGENT_MODULE = bundle.AGENT_MODULE
"""Imported once at build time by the guest's Python: a missing module fails the build."""


def compile_agent(root: Path, guest_dir: str) -> None:
    """Precompile the agent with the guest's own Python, and check that it imports there.

    The .pyc files are ``unchecked-hash``: the guest never stats the sources to validate them.
    """
    python = ["chroot", str(root), "/usr/bin/python3", "-E", "-s", "-S", "-B"]
    tools.run(
        "compile agent",
        [*python, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", guest_dir],
        hint="the agent source does not compile with the guest's Python",
        timeout=300,
    )
    tools.run(
        "check agent imports",
        [*python, "-c", f"import sys; sys.path.insert(0, {guest_dir!r}); import {AGENT_MODULE}"],
        hint="the agent imports something the guest's Python lacks",
        timeout=300,
    )


def _ancestor_times(root: Path, rel: str) -> dict[Path, tuple[int, int]]:
    """The (atime, mtime) of each existing directory between ``root`` and ``root/rel``."""
    out: dict[Path, tuple[int, int]] = {}
    d = root
    for part in Path(rel).parts:
        if not d.is_dir():
            break
        st = d.stat()
        out[d] = (st.st_atime_ns, st.st_mtime_ns)
        d = d / part
    return out


def fix_times(root: Path, guest_dir: str, ancestors: Mapping[Path, tuple[int, int]]) -> None:
    """Give everything under ``guest_dir`` a fixed mtime and put back the ancestors' times,
    so that the same base and agent always make the same squashfs."""
    top = root / guest_dir.lstrip("/")
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(os.path.join(dirpath, name), (AGENT_MTIME, AGENT_MTIME), follow_symlinks=False)
    d = top
    while d != root and d not in ancestors:
        os.utime(d, (AGENT_MTIME, AGENT_MTIME))
        d = d.parent
    for path, (atime, mtime) in sorted(ancestors.items(), key=lambda kv: -len(kv[0].parts)):
        os.utime(path, ns=(atime, mtime))


def mksquashfs_argv(tree: Path, out: Path) -> list[str]:
    return [
        "mksquashfs",
        str(tree),
        str(out),
        "-noappend",
        "-comp",
        "zstd",
        "-Xcompression-level",
        str(SQUASHFS_LEVEL),
        "-mkfs-time",
        "0",
        "-no-xattrs",
        "-quiet",
        "-no-progress",
    ]


def make_squashfs(tree: Path, out: Path) -> None:
    tools.run("mksquashfs", mksquashfs_argv(tree, out), timeout=1800)


# -- the workload's account ----------------------------------------------------------------------

USER_SHELL = "/bin/sh"
SHADOW_GROUP = "shadow"


def _rewrite(path: Path, text: str, mode: int, gid: int = 0) -> None:
    """Replace ``path`` with a new file (never write through a hard link into the base)."""
    path.unlink(missing_ok=True)
    path.write_text(text)
    os.chown(path, 0, gid)
    path.chmod(mode)


def _with_entry(text: str, name: str, line: str) -> str:
    kept = [ln for ln in text.splitlines() if ln.split(":", 1)[0] != name]
    return "\n".join([*kept, line]) + "\n"


def _group_id(group_text: str, name: str) -> int:
    for line in group_text.splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) > 2 and fields[2].isdigit():
            return int(fields[2])
    return 0


def add_user(root: Path) -> None:
    """Add the account ``user`` (uid/gid 1000, locked password) and its home, mode 0700."""
    etc = root / "etc"
    passwd = _with_entry(
        (etc / "passwd").read_text(),
        User.USER,
        f"{User.USER}:x:{USER_UID}:{USER_GID}:warden workload:{USER_HOME}:{USER_SHELL}",
    )
    group = _with_entry((etc / "group").read_text(), User.USER, f"{User.USER}:x:{USER_GID}:")
    _rewrite(etc / "passwd", passwd, 0o644)
    _rewrite(etc / "group", group, 0o644)
    # Every account's password is locked: "*" for the system ones, "!" for user.
    shadow = "".join(
        f"{name}:{'!' if name == User.USER else '*'}:19000:0:99999:7:::\n"
        for name in (line.split(":", 1)[0] for line in passwd.splitlines() if line)
    )
    _rewrite(etc / "shadow", shadow, 0o640, _group_id(group, SHADOW_GROUP))
    home = root / USER_HOME.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, USER_UID, USER_GID)
    home.chmod(0o700)


def strip_setid(root: Path) -> list[str]:
    """Clear every setuid and setgid bit of a regular file (copying it out of the hard-linked
    base first). The workload gets root only by asking the host, never through a binary.
    Returns the paths changed, relative to ``root``."""
    import stat

    changed: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                continue
            copy = path.with_name(f".{name}.warden-copy")
            shutil.copy2(path, copy)
            os.chown(copy, st.st_uid, st.st_gid)
            copy.chmod(stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            os.replace(copy, path)
            changed.append(str(path.relative_to(root)))
    return sorted(changed)


def build_rootfs(
    base: Path, agent_files: Mapping[str, bytes], guest_dir: str, out: Path, workdir: Path
) -> None:
    """Pack the tree ``base`` plus the agent into the squashfs ``out``, working in ``workdir``."""
    tree = workdir / "tree"
    link_copy(base, tree)
    try:
        ancestors = _ancestor_times(tree, guest_dir.lstrip("/"))
        add_user(tree)
        strip_setid(tree)
        write_agent(tree, agent_files)
        compile_agent(tree, guest_dir)
        fix_times(tree, guest_dir, ancestors)
        make_squashfs(tree, out)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
