# warden: every target is idempotent and installs what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
WARDEN := $(VENV)/bin/warden
APT_PACKAGES := qemu-system-x86 busybox-static mmdebstrap squashfs-tools cpio kmod lz4 libsodium23

.PHONY: help setup host-packages venv image demo test test-unit test-vm bench lint clean

help:
	@echo "make demo   - install everything, build the guest image, run a sandbox"
	@echo "make test   - install everything, then run lint and the whole test suite"
	@echo "make bench  - run the benchmarks against the qemu-guest-agent peer"

setup: host-packages venv image

host-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# On an interpreter every user can execute (scripts/base-python.sh), so that members of the
# daemon's group can run the CLI; a venv on another one is rebuilt (scripts/venv.sh).
venv:
	@scripts/venv.sh $(VENV)

image: venv host-packages
	$(WARDEN) image build default

demo: setup
	@bash scripts/demo.sh

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest tests

test-unit: venv
	$(VENV)/bin/pytest tests/unit

bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.daemon
	$(PY) -m bench.density
	$(PY) -m bench.authz
	$(PY) -m bench.links

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
