# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv/ first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Pinned for reproducibility (setup.py keeps loose ranges for users); transformers and timm only for the tests
# that check Hugging Face DETR weights against transformers' own predictions, never for the package. The CUDA builds of torch and
# torchvision run on machines without a GPU; on a GPU the ops run Triton kernels (Triton comes with torch).
PINNED := torch==2.14.1 torchvision==0.29.1 pycocotools==2.0.11 faster-coco-eval==1.8.0 scipy==1.17.1 numpy==2.4.6 \
          pyyaml==6.0.3 tqdm==4.70.1 matplotlib==3.11.2 pillow==13.0.0 pytest==9.2.0 \
          pytest-xdist==3.8.0 execnet==2.1.2 ninja==1.13.0 setuptools==84.2.1 wheel onnx==1.23.2 onnxruntime==1.32.0 \
          onnxscript==0.7.2 safetensors==0.8.0 transformers==5.25.0 timm==1.0.31
# The suite in two processes, a file each at a time (a file's fixtures built once): alone it keeps two cores half
# idle (compiles, the Triton interpreter, subprocesses); TEST_JOBS=0 runs it in one.
TEST_JOBS ?= 2
SOURCES := setup.py $(wildcard rpe_ops/csrc/*.* rpe_ops/csrc/*/*.*)

.PHONY: setup demo test test-quick benchmark gpu-check clean
setup: $(VENV)/.built

$(VENV)/.deps: Makefile
	@$(PYTHON) -c 'import sys; sys.version_info >= (3, 11) or sys.exit(f"make: {sys.executable} is Python {sys.version.split()[0]}; the pinned packages need 3.11 or later: run make PYTHON=python3.11 (or newer) $(MAKECMDGOALS)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PINNED)
	touch $@

# --no-build-isolation: an isolated build would fetch torch again.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	rm -rf outputs/demo  # the demo from the start each time (train.py refuses a new run in a run's folder)
	$(PY) tools/train.py --config configs/demo.yaml

test: setup
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

test-quick: setup
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not slow"

benchmark: setup
	$(PY) tools/benchmark.py

# On a bare GPU machine (python, torch 2.7+, torchvision, scipy, ninja; no .venv, no nvcc, no downloads): builds rpe_ops
# in place against the installed torch, runs the named checks and the benchmark, writes outputs/gpu_check.json.
# -m from the checkout: its folder is on the path, so the packages are found without an install.
gpu-check:
	$(PYTHON) -m detr_irpe.cli.gpu_check --output outputs/gpu_check.json

clean:
	rm -rf $(VENV) build *.egg-info rpe_ops/*.so
