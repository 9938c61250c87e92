# Two commands for a fresh Debian bookworm machine: `make test` and `make quickstart`.
# Both set up what they need (the virtual environment, a Docker Engine, sshd) first.

VENV := .venv
PYTHON := $(VENV)/bin/python
# Holds the hash of the pyproject.toml last installed, so an unchanged one installs nothing.
VENV_STAMP := $(VENV)/.installed-pyproject.sha256
PYTEST_ARGS ?=

.PHONY: venv test test-fast quickstart ensure-docker ensure-sshd

# torch is pinned and installed first: it resolves to the CPU wheel on this machine,
# where an unpinned torch would pull several GB of CUDA wheels.
venv:
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@if ! sha256sum --status --check $(VENV_STAMP) 2>/dev/null; then \
		set -e; \
		echo "installing into $(VENV) (pyproject.toml changed)"; \
		$(PYTHON) -m pip install torch==2.13.0; \
		$(PYTHON) -m pip install -e '.[train,dev]'; \
		sha256sum pyproject.toml > $(VENV_STAMP); \
	fi

ensure-docker:
	scripts/ensure-docker.sh

ensure-sshd:
	scripts/ensure-sshd.sh

# --durations: the slowest tests in every log, to keep the whole suite well inside 20 minutes.
test: venv ensure-docker ensure-sshd
	$(PYTHON) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: venv
	$(PYTHON) -m pytest -q -m "not docker and not ssh and not slow" $(PYTEST_ARGS)

# ensure-docker also builds runner-python:bookworm: where no registry answers, the runner builds the
# CPU trainer image on it, from wheels this machine's pip fetches (docs/runs.md, Images).
quickstart: venv ensure-docker
	$(VENV)/bin/runner run jobs/quickstart.yaml --wait
