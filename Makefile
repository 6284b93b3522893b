# fastvpd — two set-up commands: `make demo` and `make test`. Everything else is a helper target.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fastvpd-installed
APT_PKGS := libopencv-dev libturbojpeg0-dev pkg-config
DEMO_DIR ?= runs/demo

.PHONY: setup sysdeps demo test test-fast test-torch-compat test-gpu-stack lint format gpu-suite clean

setup: $(STAMP)

# System libraries FFCV compiles against (apt when root; otherwise say what is missing).
sysdeps:
	@if pkg-config --exists opencv4 2>/dev/null && [ -f /usr/include/turbojpeg.h ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "[setup] installing system packages: $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	else echo "[setup] FFCV needs system packages: sudo apt-get install $(APT_PKGS)  (continuing without the ffcv extra)"; fi

# Re-runs only when pyproject.toml changes; a no-op (< 1 s) otherwise.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	@[ -x $(VPY) ] || $(PY) -m venv $(VENV)
	@$(VPY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@echo "[setup] installing fastvpd and its extras into $(VENV) (first time: a few minutes)"
	@set -o pipefail; if pkg-config --exists opencv4 2>/dev/null; then EXTRAS='[ffcv,dali,dev]'; else EXTRAS='[dali,dev]'; fi; \
	  $(VPY) -m pip install -q -e ".$$EXTRAS" 2>&1 | { grep -v '^WARNING: Location' || true; }
	@touch $(STAMP)
	@echo "[setup] done: $$($(VPY) -c 'import torch,torchvision;print("torch",torch.__version__,"torchvision",torchvision.__version__)')"

demo: setup
	$(VPY) -m fastvpd.demo --out $(DEMO_DIR)

# Tests run in parallel worker processes (pytest-xdist), one per core up to 4; each worker builds its own copy
# of the session fixtures (the digits data). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(VPY) -m pytest -q -m "not cuda" $(XDIST) --durations=15 tests

# The CPU suite under another torch (default: the GPU machine's 2.11 / torchvision 0.26, with the Triton 3.6
# that torch pins, so the kernels' sm_90 compile test runs that Triton's compiler). An overlay venv holds only
# those three; everything else (numpy, ffcv, dali, the CUDA runtime libraries torch links against, the
# editable fastvpd) is read from $(VENV) through a .pth file. About 7 minutes.
COMPAT_TORCH ?= 2.11.0
COMPAT_TV ?= 0.26.0
COMPAT_TRITON ?= 3.6.0
COMPAT_VENV := .venv-torch$(COMPAT_TORCH)
test-torch-compat: setup
	@[ -x $(COMPAT_VENV)/bin/python ] || $(PY) -m venv $(COMPAT_VENV)
	@$(COMPAT_VENV)/bin/python -m pip install -q --no-deps torch==$(COMPAT_TORCH) torchvision==$(COMPAT_TV) triton==$(COMPAT_TRITON) 2>&1 | { grep -v '^WARNING: Location' || true; }
	@printf '%s\n' "$$($(VPY) -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')" "$$PWD" \
	  > "$$($(COMPAT_VENV)/bin/python -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/zz_fastvpd_base.pth"
	@$(COMPAT_VENV)/bin/python -c 'import torch,torchvision,triton;print("[compat] torch",torch.__version__,"torchvision",torchvision.__version__,"triton",triton.__version__)'
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not cuda" $(XDIST) tests

# The CPU suite on the GPU machine's software, as far as a CPU box can hold it: Python 3.12, torch 2.11 with
# its Triton 3.6, the carried wheels (wheels/, benchmarks/fetch_wheels.sh) and the slimmed DALI bundle that
# travels in dali_pieces/ (benchmarks/dali_pieces.sh split), installed the way gpu_suite.sh installs them.
# A venv of its own, .venv-gpu-stack; what that machine has already (numpy, pyyaml, opencv, pytest, ...) comes
# from PyPI first, as the bundle leaves it out. GPU_PY names a Python 3.12, e.g.
# GPU_PY=$$(pyenv root)/versions/3.12.1/bin/python. About 10 minutes, plus the first install.
GPU_PY ?= python3.12
GPU_VENV := .venv-gpu-stack
test-gpu-stack:
	@[ -x $(GPU_VENV)/bin/python ] || $(GPU_PY) -m venv $(GPU_VENV)
	@ls wheels/*.whl >/dev/null 2>&1 || { echo "no wheels/: run bash benchmarks/fetch_wheels.sh first"; exit 2; }
	@$(GPU_VENV)/bin/python -m pip install -q torch==$(COMPAT_TORCH) torchvision==$(COMPAT_TV) opencv-python-headless 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(GPU_VENV)/bin/python -m pip install -q --no-deps wheels/*.whl 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(GPU_VENV)/bin/python -m pip install -q -e ".[dev]" 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(GPU_VENV)/bin/python -c 'import nvidia.dali' 2>/dev/null || PYTHON=$(GPU_VENV)/bin/python bash benchmarks/dali_pieces.sh install
	@$(GPU_VENV)/bin/python -c 'import sys,torch,triton,nvidia.dali as d;print("[gpu-stack] python",sys.version.split()[0],"torch",torch.__version__,"triton",triton.__version__,"dali",d.__version__)'
	$(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not cuda" $(XDIST) tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

gpu-suite:
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf runs .pytest_cache .ruff_cache
