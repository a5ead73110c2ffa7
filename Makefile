# Two commands do all the set-up themselves: `make demo` (the main job on the tiny default) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_ENABLE_ASYNC_LOGGING := false

.PHONY: install demo test test-fast ui bench bench-demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the pair the suite is tested with (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,ui]'
	touch $(STAMP)

demo: install
	$(BIN)/cascade-studio demo

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q -ra --durations=30

test-fast: install
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q -ra -m "not slow and not browser"

ui: install
	$(BIN)/cascade-studio ui

bench: install
	$(BIN)/python benchmarks/bench_lora.py
	$(BIN)/python benchmarks/bench_lcm.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_growth.py
	$(BIN)/python benchmarks/bench_plan.py
	$(BIN)/python benchmarks/bench_launch.py
	$(BIN)/python benchmarks/bench_stream.py

bench-demo: install
	$(BIN)/python benchmarks/bench_demo.py

clean:
	rm -rf $(VENV) workspace test-artifacts
