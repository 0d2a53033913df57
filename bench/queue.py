#!/usr/bin/env python3
"""A queue of short real recordings: whisperd against the bare libraries' loops, in one run.

The issue "The accelerator never waits": a queue of short jobs should go through whisperd at
least as fast as a plain loop over the files, and faster with --batch-size / --pack.
The queue: every English Asterisk prompt (Debian's asterisk-core-sounds-en-g722, a woman's
recorded voice) of 5 to 15 s, shortest first (36 files, 279 s); the references are the
package's scripts. Each mode below transcribes the whole queue in its own process, with the
`whisper` command line's decoding (beam 5, best of 5, temperature fallback 0.0..1.0):
  bare-ow             whisper.transcribe() in a loop (model tiny.en.pt by path; fp16 on a GPU)
  bare-fw             faster-whisper WhisperModel(tiny.en/) int8 (float16 on a GPU), a loop
  whisperd-ow         whisperd --engine openai-whisper          (all jobs submitted at once,
  whisperd-fw         whisperd --engine faster-whisper           wall time from the first
  whisperd-fw-batch8  ... --batch-size 8                         submit to the last job done)
  whisperd-fw-pack    ... --batch-size 8 --pack
  whisperd-fw-2cpu    ... --device cpu,cpu (two workers splitting the cores; cuda,cuda on a GPU)
  whisperd-fw-2cpu-batch8, whisperd-fw-2cpu-pack   two workers, each batching (or packing):
                      only when named in --only
  bare-batch          whisperd's own Batch (batch 8, not packed) called in one process with
                      the whole queue at once: no HTTP, no store, no arrival in turn; what
                      batching gives when every job is there from the start
  bare-pack           the same, packed
  ...-tokens, ...-words   a batching mode (whisperd-fw-batch8, -pack, bare-batch, -pack) with
                      its windows timed one way (--batch-timing): only when named in --only
The modes run in turn, --rounds times (3), every other round in reverse order (the second
of two runs back to back was measured the slower, 6 times of 6), and each mode's median
wall time is its figure: one pass of a mode varies by 10 to 20% between rounds on these
shared machines.
Every process first transcribes one warm-up prompt (agent-pass, not in the queue); loading
and warm-up are not timed. WER: tools/harness.py's, after a local normalisation on both sides
(numbers 0-10 as words, '#' as "pound", '*' as "star", notes in brackets dropped).
Targets (ratios of this run): whisperd >= 1.0x its library's loop; batch8 >= 1.5x and pack
>= 2.5x bare-fw; each whisperd mode's WER within +0.02 of whisperd-fw (or -ow).

  .venv/bin/python bench/queue.py                 # the whole queue (waits for a quiet machine)
  .venv/bin/python bench/queue.py --quick --rounds 1   # the first 8 files, to check it runs
  .venv/bin/python bench/queue.py --only bare-fw,whisperd-fw-pack
  python bench/queue.py --device cuda --no-wait   # on a GPU host
Raw figures: bench/out/queue.json.
"""

import sys
from pathlib import Path

# This file shares its name with the standard library's `queue`, which torch, faster-whisper
# and concurrent.futures import: its folder goes off the path, and _common is bench._common.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from bench._common import (CLI_DECODING, JOB_TIMEOUT,  # noqa: E402
                           LOGPROB_THRESHOLD, MODEL_DIR, OUT, PYTHON, CpuWatch, Daemon,
                           audio_seconds, ensure_models, peak_rss_mib, print_machine,
                           wait_until_quiet, word_error_rate)
from tools.harness import SOUNDS, VOICES, prompt  # noqa: E402

SCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
WARM = "agent-pass"  # 3.5 s, outside the queue
FW = ["--engine", "faster-whisper"]
MODES = {  # name: whisperd flags (None: a bare loop)
    "bare-ow": None, "bare-fw": None, "whisperd-ow": ["--engine", "openai-whisper"],
    "whisperd-fw": FW, "whisperd-fw-batch8": FW + ["--batch-size", "8"],
    "whisperd-fw-pack": FW + ["--batch-size", "8", "--pack"], "whisperd-fw-2cpu": FW,
    "whisperd-fw-2cpu-batch8": FW + ["--batch-size", "8"],
    "whisperd-fw-2cpu-pack": FW + ["--batch-size", "8", "--pack"],
    "bare-batch": None, "bare-pack": None}
TIMED = ("whisperd-fw-batch8", "whisperd-fw-pack", "bare-batch", "bare-pack")
MODES.update({f"{m}-{t}": MODES[m] and MODES[m] + ["--batch-timing", t]
              for m in TIMED for t in ("tokens", "words")})
ON_REQUEST = {"whisperd-fw-2cpu-batch8", "whisperd-fw-2cpu-pack",  # not in a default run
              *(m for m in MODES if m.endswith(("-tokens", "-words")))}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "ten"]


def queue_files():
    """[(path, script, seconds)] of the English prompts of 5 to 15 s, shortest first."""
    found, voice = [], SOUNDS / VOICES["en"]
    with gzip.open(SCRIPTS, "rt", encoding="utf-8") as f:
        names = [line.partition(":")[0].strip() for line in f
                 if ":" in line and not line.startswith(";")]
    for name in names:
        path = voice / f"{name}.g722"  # G.722 is 8000 bytes a second: skip the rest unprobed
        if name.startswith("silence/") or not path.exists() or \
                not 4 * 8000 <= path.stat().st_size <= 16 * 8000:
            continue
        script, seconds = prompt("en", name)[1], audio_seconds(path)
        if not re.fullmatch(r"\s*\[[^\]]*\]\s*", script) and 5 <= seconds <= 15:
            found.append((path, script, seconds))
    return sorted(found, key=lambda f: (f[2], str(f[0])))


def normal(text):
    """Both sides of the WER: notes in brackets gone, '#'/'*' and numbers 0-10 as words."""
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text)
    text = text.replace("#", " pound ").replace("*", " star ")
    return re.sub(r"\b(10|\d)\b", lambda m: f" {NUMBERS[int(m.group())]} ", text)


def wer(scripts, texts):
    return word_error_rate(*((normal(s), normal(t)) for s, t in zip(scripts, texts)))


def _runner(kind, spec):
    """run(paths) -> their texts, for a bare mode: `ow` and `fw` a loop over the library,
    `batch` and `pack` whisperd's own Batch (batch 8; packed or not) on every file at once (its audio decoded,
    as faster-whisper decodes it, inside the timed part)."""
    device = spec["device"]
    if kind == "ow":
        import whisper
        model = whisper.load_model(spec["model"] + ".pt", device=device)

        def transcribe(path):
            return whisper.transcribe(model, str(path), logprob_threshold=LOGPROB_THRESHOLD,
                                      verbose=None, fp16=device != "cpu",
                                      **CLI_DECODING)["text"]
        return lambda paths: [transcribe(path) for path in paths]
    from faster_whisper import WhisperModel, decode_audio
    where, _, index = device.partition(":")
    model = WhisperModel(spec["model"], device=where, device_index=int(index or 0),
                         compute_type=spec["compute_type"])
    if kind == "fw":
        def text(path):
            segments, _ = model.transcribe(str(path), log_prob_threshold=LOGPROB_THRESHOLD,
                                           **CLI_DECODING)
            return "".join(s.text for s in segments)
        return lambda paths: [text(path) for path in paths]
    import whisperd

    def run(paths):
        jobs = [whisperd.Job(id=str(i), model="tiny.en", language="en")
                for i in range(len(paths))]
        batch = whisperd.Batch(whisperd.BatchDecoder(model, spec["timing"]), 8,
                               pack=kind == "pack")
        batch.add([(job, decode_audio(str(path))) for job, path in zip(jobs, paths)])
        done = {}
        while batch:
            done.update(batch.step())
        return [done[job]["text"] for job in jobs]
    return run


def worker(kind):
    """`--worker ow|fw|pack`: a bare mode. Reads {model, device, compute_type, warm, files}
    on stdin; loads and warms up untimed, times the queue; answers one JSON line."""
    spec = json.loads(sys.stdin.read())
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print stays out of the answer
    started = time.monotonic()
    run = _runner(kind, spec)
    run([spec["warm"]])
    ready = time.monotonic() - started
    started = time.monotonic()
    texts = run(spec["files"])
    wall = time.monotonic() - started
    protocol.write(json.dumps({"wall_s": wall, "texts": texts, "warmup_s": ready,
                               "peak_rss_mib": peak_rss_mib(os.getpid())}) + "\n")
    protocol.close()


def bare(name, args, warm, files):
    kind, _, timing = name[5:].partition("-")  # bare-pack-words: pack, words
    spec = {"model": os.path.join(args.model_dir, args.model), "device": args.device,
            "warm": str(warm), "files": [str(f) for f in files], "timing": timing or "auto",
            "compute_type": "float16" if args.device != "cpu" else "int8"}
    done = subprocess.run([PYTHON, __file__, "--worker", kind],
                          input=json.dumps(spec), capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"bare-{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def whisperd(name, args, warm, files, scratch):
    flags, device = list(MODES[name]), args.device
    if "-2cpu" in name:
        device = f"{args.device},{args.device}"
    if flags[1] == "faster-whisper":
        flags += ["--compute-type", "int8" if args.device == "cpu" else "float16"]
    out = scratch / name
    out.mkdir(parents=True)
    daemon = Daemon(scratch / f"state-{name}", args.model_dir, *flags, "--device", device,
                    "--max-queue", "100000", "--history", "100000", model=args.model).start()
    try:
        started = time.monotonic()
        daemon.completed(daemon.submit(path=warm, output_path=out)["id"], JOB_TIMEOUT)
        ready = time.monotonic() - started
        started = time.monotonic()
        ids = [daemon.submit(path=f, output_path=out, format="txt")["id"] for f in files]
        submitted = time.monotonic() - started
        jobs = [daemon.finished(i, JOB_TIMEOUT) for i in ids]
        wall = time.monotonic() - started
        peak = peak_rss_mib(daemon.proc.pid)
    finally:
        try:
            daemon.stop()
        except AssertionError:
            print(f"  {name}: whisperd logged a traceback:\n{daemon.log[-3000:]}", flush=True)
    failed = [j["error"] for j in jobs if j["status"] != "COMPLETED"]
    return {"wall_s": wall, "texts": [j["result"] for j in jobs], "warmup_s": ready,
            "submit_s": submitted, "peak_rss_mib": peak, "failed": failed,
            "duration_s": [j["Duration"] for j in jobs], "workers": [j["worker"] for j in jobs]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=MODEL_DIR, help="tiny.en.pt and tiny.en/")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--quick", action="store_true", help="the first 8 files")
    parser.add_argument("--rounds", type=int, default=3,
                        help="every mode this many times, in turn; the median counts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--only", help="comma separated, of: " + ", ".join(MODES))
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for a quiet machine (--quick never waits)")
    parser.add_argument("--json", default=str(OUT / "queue.json"))
    parser.add_argument("--worker", choices=("ow", "fw", "batch", "pack"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    named = args.only or ",".join(m for m in MODES if m not in ON_REQUEST)
    want = [m.strip() for m in named.split(",") if m.strip()]
    if set(want) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(set(want) - set(MODES)))}")
    args.model_dir = ensure_models(args.model_dir, args.model)

    queue = queue_files()[:8 if args.quick else None]
    files, scripts, seconds = zip(*queue)
    audio, warm = sum(seconds), prompt("en", WARM)[0]
    print(f"queue: {len(files)} prompts, {audio:.0f} s of audio ({min(seconds):.1f} to "
          f"{max(seconds):.1f} s each), model {args.model}, device {args.device}", flush=True)
    m = print_machine()
    scratch = OUT / "scratch-queue"
    shutil.rmtree(scratch, ignore_errors=True)
    if not (args.quick or args.no_wait):
        wait_until_quiet()

    began, watch, runs = time.monotonic(), CpuWatch(), {name: [] for name in want}
    for round_no in range(1, args.rounds + 1):  # the modes in turn, each round
        if args.rounds > 1:
            print(f"round {round_no} of {args.rounds}", flush=True)
        for name in want if round_no % 2 else want[::-1]:  # each mode first and last
            print(f"  {name} ...", end=" ", flush=True)
            r = (bare(name, args, warm, files) if MODES[name] is None
                 else whisperd(name, args, warm, files, scratch / str(round_no)))
            r.update(speed=audio / r["wall_s"], wer=wer(scripts, r["texts"]))
            print(f"{r['wall_s']:.2f} s ({r['speed']:.2f}x real time), WER {r['wer']:.3f}"
                  + (f", {len(r['failed'])} FAILED: {r['failed'][0]}" if r.get("failed")
                     else ""), flush=True)
            runs[name].append(r)
    rows = {}  # each mode: its first round, with the median wall time of the rounds
    for name, results in runs.items():
        walls = [r["wall_s"] for r in results]
        rows[name] = dict(results[0], walls_s=walls, wall_s=statistics.median(walls),
                          failed=[f for r in results for f in r.get("failed", [])])
        rows[name]["speed"] = audio / rows[name]["wall_s"]

    def ratio(name, base):  # speed of `name` over `base`, or None
        return rows[base]["wall_s"] / rows[name]["wall_s"] if {name, base} <= rows.keys() \
            else None
    fmt = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731
    rounds = f"the median of {args.rounds} rounds" if args.rounds > 1 else "one round"
    print(f"\n{len(files)} files, {audio:.1f} s of audio, {args.device}; {rounds}\n"
          "| mode | wall s | audio s / wall s | x bare-ow | x bare-fw | WER | peak RSS MiB |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.2f} | {r['speed']:.2f} | {fmt(ratio(name, 'bare-ow'))}"
              f" | {fmt(ratio(name, 'bare-fw'))} | {r['wer']:.3f} | {r['peak_rss_mib']:.0f} |")
    print("WER after normalising both sides: numbers 0-10 as words, '#' -> pound, "
          "'*' -> star, notes in brackets dropped\n")

    targets = []
    for name, base, least in (("whisperd-ow", "bare-ow", 1.0), ("whisperd-fw", "bare-fw", 1.0),
                              ("whisperd-fw-batch8", "bare-fw", 1.5),
                              ("whisperd-fw-pack", "bare-fw", 2.5)):
        value = ratio(name, base)
        # Each round against the loop run in the same round (the machine drifts between
        # rounds): shown beside the verdict, which stays on the medians.
        paired = [b / n for b, n in zip(rows[base]["walls_s"], rows[name]["walls_s"])] \
            if value is not None else []
        targets.append({"target": f"{name} >= {least}x {base}", "value": value,
                        "pass": value is not None and value >= least, "rounds": paired,
                        "text": "not measured" if value is None else f"{value:.2f}x" + (
                            f" (round by round: {', '.join(f'{p:.2f}' for p in paired)})"
                            if len(paired) > 1 else "")})
    for name in ("whisperd-fw-batch8", "whisperd-fw-pack", "whisperd-fw-2cpu"):
        if {name, "whisperd-fw"} <= rows.keys():
            worse = rows[name]["wer"] - rows["whisperd-fw"]["wer"]
            targets.append({"target": f"{name} WER <= whisperd-fw's + 0.02", "value": worse,
                            "pass": worse <= 0.02, "text": f"{rows[name]['wer']:.3f} vs "
                            f"{rows['whisperd-fw']['wer']:.3f} ({worse:+.3f})"})
    for t in targets:
        verdict = "PASS" if t["pass"] else "MISS" if t["value"] is not None else "----"
        print(f"{verdict}  {t['target']}: {t['text']}")
    text, foreign_s, foreign_share = watch.verdict()
    wall = time.monotonic() - began
    print(f"\n{text}\nmeasured in {wall:.0f} s; results in {args.json}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": m, "device": args.device,
        "model": args.model, "quick": args.quick, "audio_s": audio,
        "files": [{"path": str(f), "seconds": s, "script": t}
                  for f, s, t in zip(files, seconds, scripts)],
        "rows": rows, "targets": targets, "bench_wall_s": wall, "foreign_cpu_s": foreign_s,
        "foreign_cpu_share": foreign_share}, indent=2) + "\n")
    return 1 if any(r.get("failed") for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
