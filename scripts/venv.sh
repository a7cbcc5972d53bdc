#!/bin/sh
# Make the venv (idempotent): on an interpreter every user can execute (base-python.sh), with the
# hash-checked requirements.lock and warden itself (editable). A venv on another interpreter (an
# older one under /root/.pyenv, say) is removed and rebuilt; an up-to-date one is left alone.
set -eu
venv=$1
py=$venv/bin/python
stamp=$venv/.installed
want=$(readlink -f "$(scripts/base-python.sh)")
if [ -e "$py" ] && [ "$(readlink -f "$py")" != "$want" ]; then
  echo "rebuilding $venv on $want, which every user can execute"
  rm -rf "$venv"
fi
if [ -e "$stamp" ] && [ ! requirements.lock -nt "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ]; then
  exit 0
fi
command -v uv >/dev/null || python3 -m pip install -q uv
set -x
uv venv --allow-existing --python "$want" "$venv"
uv pip install --python "$py" --require-hashes -r requirements.lock
uv pip install --python "$py" --no-deps -e .
chmod -R a+rX "$venv"
touch "$stamp"
