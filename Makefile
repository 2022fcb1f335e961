# The same commands CI runs (.ci/run), one target each. `make help` lists them.
PYTHON ?= python3
BUILD ?= build/cmake
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PY_SOURCES = cbd_fast tests benchmarks scripts setup.py

.PHONY: help install test pytest ctest bench lint format ci gpu-rot gpu-check demo info clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## install deps and build the extension (scripts/install.sh --test)
	bash scripts/install.sh --test

test:  ## the README's test command: install, pytest, ctest (scripts/test.sh)
	bash scripts/test.sh

pytest:  ## pytest only, no install step
	$(PYTHON) -m pytest

ctest:  ## C++ unit tests of the kernel cores (CMake + ctest)
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD) -j $(JOBS)
	cd $(BUILD) && ctest --output-on-failure

bench:  ## benchmark suites side by side, JSON in benchmarks/results/ (ARGS=... for pytest options)
	mkdir -p benchmarks/results
	$(PYTHON) -m pytest benchmarks/bench_*.py -p no:cacheprovider \
	  --benchmark-json=benchmarks/results/bench-$(shell date +%Y%m%d-%H%M%S).json $(ARGS)

lint:  ## ruff check + ruff format --check
	ruff check $(PY_SOURCES)
	ruff format --check $(PY_SOURCES)

format:  ## ruff format + ruff check --fix
	ruff format $(PY_SOURCES)
	ruff check --fix $(PY_SOURCES)

ci:  ## everything CI runs: tests + GPU-rot checks (.ci/run)
	bash .ci/run

gpu-rot:  ## GPU code-rot checks without a GPU: nvcc sm_90, Triton for Hopper, CUDA extension link
	bash .ci/run nvcc triton cuda-ext

gpu-check:  ## on a machine WITH a GPU: correctness and timings (benchmarks/gpu_check.sh)
	bash benchmarks/gpu_check.sh

demo:  ## the main job: the Fashion-MNIST demo (scripts/demo.sh)
	bash scripts/demo.sh

info:  ## how cbd_fast was built and which backends can run here
	$(PYTHON) -m cbd_fast.info

clean:  ## remove build products (keeps the installed package's record)
	rm -rf build $(BUILD) *.egg-info cbd_fast/_C*.so
