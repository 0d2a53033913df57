#!/usr/bin/env bash
# The GPU figures RESULTS.md asks for, in one prepared run that fits about 10 minutes of a
# lent GPU (issue "No process per job", point 4):
#   1. bench/overhead.py --device cuda   the worker's own time per job (target: under 5 ms)
#   2. bench/queue.py --device cuda      packed and batched against the bare faster-whisper
#      loop (target 5x), unbatched per engine, and two workers on one GPU (`cuda,cuda`)
#      against one; one round (a GPU run varies less than these 2 shared cores)
#   3. bench/timestamps.py --device cuda  what timing a batch by timestamp tokens costs there
#   4. bench/transcribe.py --device cuda  one file at a time, each engine and the CLI (last:
#      the longest; its figures come as it goes)
# On a GPU host with what `make bench` installs (CUDA PyTorch: `make deps TORCH=torch`):
#   bash bench/gpu.sh            # raw figures in bench/out/*-cuda.json
# A machine with no network (the lent one) needs the wheels of openai-whisper,
# faster-whisper, ctranslate2 and PyAV, an `ffmpeg`, the models and the Asterisk prompts
# carried in: bench/device/prepare.sh makes them ready (RESULTS.md, "A queue on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" bench/overhead.py --device cuda --jobs 24 --json bench/out/overhead-cuda.json
"$PY" bench/queue.py --device cuda --no-wait --rounds 1 --json bench/out/queue-cuda.json \
  --only bare-ow,bare-fw,whisperd-ow,whisperd-fw,whisperd-fw-batch8,whisperd-fw-pack,whisperd-fw-2cpu,bare-batch,bare-pack,whisperd-fw-batch8-tokens,whisperd-fw-pack-tokens
"$PY" bench/timestamps.py --device cuda --json bench/out/timestamps-cuda.json
"$PY" bench/transcribe.py --device cuda --no-wait --json bench/out/transcribe-cuda.json
