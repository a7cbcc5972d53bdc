#!/usr/bin/env bash
# A short tour of warden through its CLI and SDK. Run by `make demo` after setup.
set -euo pipefail
cd "$(dirname "$0")/.."
W=.venv/bin/warden
step() { printf '\n\033[1;34m$ %s\033[0m\n' "$*"; }

step warden doctor
$W doctor || true

step warden image list
$W image list

step "warden run -- uname -a"
$W run -- uname -a

step "warden run -e WHO=demo --shell -- 'echo hello \$WHO from a microVM; head -2 /proc/meminfo'"
$W run -e WHO=demo --shell -- 'echo hello $WHO from a microVM; head -2 /proc/meminfo'

step "warden run -- python3 -c 'import sys; sys.exit(3)'   (the exit code comes back)"
set +e
$W run -- python3 -c 'import sys; print("exiting with 3"); sys.exit(3)'
echo "exit code: $?"
set -e

step "warden run -- id   (commands run as the unprivileged user; --user root on request)"
$W run -- id
$W run --user root -- id

step "python: Sandbox.create() / commands.run() / files.write() / files.read()"
.venv/bin/python - <<'PY'
import warden

with warden.Sandbox.create(memory_mib=256) as sbx:
    sbx.files.write("/home/user/hello.py", "print('hello from a file written by the SDK')\n")
    result = sbx.commands.run(["python3", "hello.py"])  # the cwd is the user's home
    print("stdout:", result.stdout.strip(), "| exit code:", result.exit_code)
    print("info:", sbx.info())
print("the sandbox is gone; nothing is left behind")
PY
