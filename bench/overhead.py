#!/usr/bin/env python3
"""The worker's own time per job: what whisperd adds between two calls of the library.

A runner's whole life is: claim a job, take its audio, call the engine's library
(whisper.transcribe() or WhisperModel.transcribe()), hand the result back, claim the next.
Everything but the library's work is the worker's own overhead. The audio is the library's
work too (its loop decodes each file between two calls): decoded ahead on a GPU or for a
batch, and on a CPU by the runner itself between two jobs (the model keeps the cores busy);
the runner's decoding is timed apart, shown, and not counted in the overhead. This script
measures it from inside one whisperd (its real Service: the store on disk, the runner, the
prefetcher, the finisher writing the files, in one process as the daemon runs them): every
job of the queue is submitted through the door (Service.submit) before the runners start,
so a runner never waits for work, and each library call's start and end are recorded (the
library is called as whisperd calls it; the recording adds two clock reads). The overhead
of a job is the time from the library's return for one job to its call for the next, on one
runner.

Beside it, in the same run: the bare library loop over the same files (decoding the audio
itself, as a script would), for the share of the wall time the library takes in each.
Target (issue "No process per job"): under 5 ms a job.

  .venv/bin/python bench/overhead.py                      # both engines, 24 prompts
  .venv/bin/python bench/overhead.py --engine faster-whisper --jobs 12
  python bench/overhead.py --device cuda                  # on a GPU host
Raw figures: bench/out/overhead.json.
"""

import sys
from pathlib import Path

# bench/queue.py shares its name with the standard library's `queue`: this folder goes off
# the path (as in queue.py), and the bench's modules are imported as bench.*.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from bench._common import (CLI_DECODING, JOB_TIMEOUT,  # noqa: E402
                           LOGPROB_THRESHOLD, MODEL_DIR, OUT, ensure_models, print_machine)
from bench.queue import queue_files  # noqa: E402  (the same recorded prompts)
import whisperd  # noqa: E402


def timed(calls, function, runner_only=False):
    """`function`, recording (start, end) of each call into `calls` (`runner_only`: of the
    calls made on a runner's thread, not a prefetcher's)."""
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if not runner_only or threading.current_thread().name.startswith("runner"):
                calls.append((start, time.perf_counter()))
    return call


def through_whisperd(args, files, scratch):
    """Runs the queue through one in-process whisperd; its wall time, library time, gaps."""
    settings = whisperd.parse_settings([
        "--state-dir", str(scratch / "state"), "--model-dir", args.model_dir,
        "--default-model", args.model, "--engine", args.engine, "--device", args.device,
        "--max-queue", "100000", "--history", "100000"] +
        (["--compute-type", "int8" if args.device == "cpu" else "float16"]
         if args.engine == "faster-whisper" else []))
    service = whisperd.Service(settings, "overhead", "http://127.0.0.1:0")
    calls, decodes, engine = [], [], service.runners[0].engine
    engine.transcribe = timed(calls, engine.transcribe)
    engine.load_audio = timed(decodes, engine.load_audio, runner_only=True)
    out, warm = scratch / "out", scratch / "warm"
    out.mkdir()
    warm.mkdir()
    # The first job loads and warms the model; the rest are queued before the runner starts.
    ids = [service.submit({"path": str(f), "output_path": str(folder), "format": "txt"}
                          )["id"] for f, folder in [(files[0], warm)] + [(f, out) for f in files]]
    started = time.perf_counter()
    service.start()
    wait_ended(service, ids)
    wall = time.perf_counter() - started
    jobs = [service.queue.show(i) for i in ids]
    service.stop(5)
    def decoding(after, before):  # seconds the runner spent decoding audio in between
        return sum(e - s for s, e in decodes if after <= s and e <= before)
    pairs = list(zip(calls[1:], calls[2:]))  # after the warm-up call
    gaps = [b[0] - a[1] - decoding(a[1], b[0]) for a, b in pairs]
    return {"wall_s": wall - (calls[1][0] - started), "library_s": sum(
        e - s for s, e in calls[1:]), "calls": len(calls) - 1,
        "gaps_ms": [g * 1000 for g in gaps],
        "decoding_ms": [decoding(a[1], b[0]) * 1000 for a, b in pairs],
        "failed": [j["error"] for j in jobs if j["status"] != "COMPLETED"]}


def wait_ended(service, ids):
    """Until every job has ended, woken by the queue's own changes (JobQueue.wait): no
    polling beside the runner it measures."""
    deadline = time.monotonic() + JOB_TIMEOUT
    for i in ids:
        service.queue.wait(i, max(0.0, deadline - time.monotonic()))
    if any(service.queue.show(i)["status"] not in whisperd.FINISHED for i in ids):
        raise TimeoutError(f"the jobs did not end within {JOB_TIMEOUT} s")


def bare(args, files):
    """The library's own loop over the same files: wall time and library time."""
    calls = []
    if args.engine == "openai-whisper":
        import whisper
        model = whisper.load_model(os.path.join(args.model_dir, args.model + ".pt"),
                                   device=args.device)
        run = timed(calls, lambda audio: whisper.transcribe(
            model, audio, logprob_threshold=LOGPROB_THRESHOLD, verbose=None,
            fp16=args.device != "cpu", **CLI_DECODING)["text"])
        load = whisper.load_audio
    else:
        from faster_whisper import WhisperModel, decode_audio
        model = WhisperModel(os.path.join(args.model_dir, args.model), device=args.device,
                             compute_type="int8" if args.device == "cpu" else "float16")
        run = timed(calls, lambda audio: "".join(s.text for s in model.transcribe(
            audio, log_prob_threshold=LOGPROB_THRESHOLD, **CLI_DECODING)[0]))
        load = decode_audio
    run(load(str(files[0])))  # warm
    calls.clear()
    started = time.perf_counter()
    for f in files:
        run(load(str(f)))
    return {"wall_s": time.perf_counter() - started,
            "library_s": sum(e - s for s, e in calls), "calls": len(calls)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=MODEL_DIR)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--engine", help="one engine (default: both)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=24, help="the shortest prompts, this many")
    parser.add_argument("--json", default=str(OUT / "overhead.json"))
    args = parser.parse_args()
    args.model_dir = ensure_models(args.model_dir, args.model)
    files = [f for f, _, _ in queue_files()[:args.jobs]]
    m = print_machine()
    rows = {}
    for engine in [args.engine] if args.engine else ["openai-whisper", "faster-whisper"]:
        args.engine = engine
        with tempfile.TemporaryDirectory() as scratch:
            d = through_whisperd(args, files, Path(scratch))
        b = bare(args, files)
        gaps = sorted(d["gaps_ms"])
        rows[engine] = {"whisperd": d, "bare": b, "median_ms": statistics.median(gaps),
                        "mean_ms": statistics.fmean(gaps),
                        "p90_ms": gaps[int(0.9 * (len(gaps) - 1))], "max_ms": gaps[-1]}
        print(f"{engine}, {len(files)} jobs on {args.device}: the worker's own time per job "
              f"median {rows[engine]['median_ms']:.2f} ms, mean {rows[engine]['mean_ms']:.2f}"
              f", p90 {rows[engine]['p90_ms']:.2f}, max {gaps[-1]:.2f} ms (besides, the "
              f"runner decoded audio {statistics.median(d['decoding_ms']):.1f} ms a job, "
              f"median); the library's "
              f"share of the wall time: whisperd {d['library_s'] / d['wall_s']:.3f}, its bare "
              f"loop {b['library_s'] / b['wall_s']:.3f} (which decodes each file between "
              f"calls); wall whisperd / bare {d['wall_s'] / b['wall_s']:.2f}"
              + (f"; FAILED: {d['failed']}" if d["failed"] else ""), flush=True)
        args.engine = None
    worst = max(r["median_ms"] for r in rows.values())
    print(f"{'PASS' if worst < 5 else 'MISS'}  the worker's own time per job under 5 ms "
          f"(median): {worst:.2f} ms at most")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": m, "device": args.device,
        "model": args.model, "files": [str(f) for f in files], "rows": rows}, indent=2) + "\n")
    return 1 if any(r["whisperd"]["failed"] for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
