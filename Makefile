# Two commands do everything on a fresh Linux machine with Python 3.11 and no torch:
#   make demo   set up .venv, build csrc/, run the main job (see README.md)
#   make test   set up .venv, build csrc/, run the default test suite
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
EXTRAS ?= onnx,openvino,triton,hf,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-all lint bench clean

setup: $(STAMP)

# torch is installed first and pinned, and the extension is built against it without build
# isolation: an unpinned torch in an isolated build would pull the CUDA wheels.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) numpy
	$(PY) -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	$(PY) -c "import torch_cp._C, torch; print('built torch_cp._C against torch', torch.__version__)"
	touch $@

# The main job: each package at work, in about 5 minutes on 2 cores.
demo: setup
	@echo "== single-backend baselines (a small subset of the zoo) =="
	$(PY) benchmarks/bench_baselines.py --subset small
	@echo "== torch_collage: a model compiled with backend='collage', its placement and speed =="
	$(PY) examples/collage_demo.py --model mlp --size full
	@echo "== torch_cp: one decode step over a KV cache sharded on 2 local processes =="
	$(VENV)/bin/torchrun --nproc-per-node 2 examples/cp_decode.py
	@echo "== LLM decode with a static cache: every backend side by side, collage with torch_cp's attention =="
	$(PY) benchmarks/bench_llm.py --small --contexts 4096 --batches 1 --rounds 2 --out-dir $${TMPDIR:-/tmp}/torch-collage-demo
	@echo "== torch_graphpipe: a branchy model trained on 4 local processes, its plan =="
	$(VENV)/bin/torchrun --standalone --nproc-per-node 4 examples/graphpipe_train.py

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/bench_baselines.py

clean:
	rm -rf build *.egg-info torch_cp/*.so $(STAMP)

# --- GPU check (issue 30): every GPU path built, tested and benchmarked in one device call ------------
# make gpu-wheels      download (here, from PyPI) the wheels the GPU machine lacks into .gpu_wheels/
# make gpu-check       on the GPU machine: tools/gpu_check.py, results under $OUT (see its docstring
#                      for the exact device call); DRY=1: the same steps on this CPU, CUDA hidden
GPU_WHEELS_DIR ?= .gpu_wheels
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=

.PHONY: gpu-check gpu-wheels

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_CHECK_PY) tools/gpu_check.py $(if $(DRY),--dry-run) --wheels $(GPU_WHEELS_DIR) $(GPU_CHECK_ARGS)

gpu-wheels:
	PYTHON=$(GPU_CHECK_PY) sh tools/gpu_wheels.sh $(GPU_WHEELS_DIR)
