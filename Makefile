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
