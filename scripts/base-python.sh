#!/bin/sh
# Print the interpreter that warden's venv is built on: one that every user can execute, so that
# members of the daemon's group can run .venv/bin/warden (a pyenv under /root cannot be).
# /usr/bin/python3 when it is >= 3.11; else a uv-managed CPython in /opt/warden/python.
set -eu
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -x /usr/bin/python3 ] && new_enough /usr/bin/python3; then
  echo /usr/bin/python3
  exit 0
fi
command -v uv >/dev/null || python3 -m pip install -q uv >&2
export UV_PYTHON_INSTALL_DIR=/opt/warden/python
mkdir -p "$UV_PYTHON_INSTALL_DIR"
uv python install 3.11 >&2
chmod -R a+rX /opt/warden
uv python find --managed-python 3.11
