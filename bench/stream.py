#!/usr/bin/env python3
"""Results as they are decoded: how soon the first words come, and what a resumed run costs.

For each engine, on a file of recorded speech (Debian's Asterisk prompts, one after the
other, --minutes long), through one whisperd on this machine:

1. Time to the first segment against time to the whole transcript: the job is submitted
   and its event stream (GET /transcription/job/ID/events) read at once; the clock runs
   from the POST to the first `segment` event, and to the `end` event.
2. A resumed run against a fresh one: the same file again, `kill -9` of whisperd once the
   stream says progress >= --kill-at, a new whisperd on the same state folder; the job's
   second run (its `Duration`, attempt 2) against the fresh run's `Duration`, and the
   words that differ between the two transcripts (edit distance).

The model is loaded before anything is timed. Figures in bench/out/stream.json.
    .venv/bin/python bench/stream.py [--minutes 10] [--engine faster-whisper]
"""

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MODEL_DIR, OUT, CpuWatch, Daemon, ensure_models,  # noqa: E402
                     machine, speak, wait_until_quiet)
from tools.harness import SOUNDS, VOICES, audio_seconds, convert, edit_distance, words  # noqa: E402

ENGINES = ("openai-whisper", "faster-whisper")


def recording(minutes, folder):
    """A file of recorded prompts, at least `minutes` long (cached), in a shuffled order:
    in the package's order, prompts of one kind follow each other ("...followed by the
    pound key" five times) and Whisper's fallback samples those windows at a temperature
    over 0, so that two runs differ before any seam."""
    target = folder / f"prompts-{minutes:g}min-shuffled.wav"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    prompts, total = [], 0.0
    every = sorted((SOUNDS / VOICES["en"]).glob("*.g722"))
    random.Random(16).shuffle(every)
    for path in every:
        prompts.append(path)
        total += audio_seconds(path)
        if total >= minutes * 60:
            break
    listing = folder / "prompts.txt"
    listing.write_text("".join(f"file '{p}'\n" for p in prompts))
    convert(listing, target, "-ar", "16000", "-ac", "1",
            before=("-f", "concat", "-safe", "0"))
    return target


def follow(daemon, job_id, began, kill_at=None):
    """Reads the job's events: (seconds from `began` to its first segment, to its end, or
    to the progress `kill_at` when given)."""
    first = None
    with daemon.stream(f"/transcription/job/{job_id}/events") as (status, events):
        assert status == 200, status
        for event in events:
            if event["event"] == "segment" and first is None:
                first = time.monotonic() - began
            if kill_at is not None and event["event"] == "progress" and \
                    event["data"]["progress"] >= kill_at:
                return first, time.monotonic() - began
            if event["event"] == "end":
                return first, time.monotonic() - began
    raise AssertionError("the stream ended without an end")


def measure(engine, audio, model_dir, scratch, kill_at):
    state = scratch / engine / "state"
    shutil.rmtree(scratch / engine, ignore_errors=True)
    out = scratch / engine / "out"
    out.mkdir(parents=True)
    daemon = Daemon(state, model_dir, "--engine", engine).start()
    try:
        warm = speak("Thank you for calling.", scratch / engine / "warm.wav")
        daemon.completed(daemon.submit(path=warm, output_path=out)["id"])
        began = time.monotonic()
        job = daemon.submit(path=audio, output_path=out)
        first, whole = follow(daemon, job["id"], began)
        fresh = daemon.completed(job["id"])
        second = daemon.submit(path=audio, output_path=out)
        follow(daemon, second["id"], time.monotonic(), kill_at)
        daemon.kill()
    finally:
        if daemon.proc.poll() is None:  # it did not reach the kill
            daemon.stop()
    again = Daemon(state, model_dir, "--engine", engine).start()
    try:
        resumed = again.completed(second["id"])
    finally:
        again.stop()
    def sampled(job):  # windows decoded at a temperature over 0: sampled, so random
        return len({(s["seek"], s["temperature"]) for s in job_segments(state, job["id"])
                    if s["temperature"] > 0})
    return {"first_segment_s": round(first, 2), "whole_s": round(whole, 2),
            "windows_sampled": [sampled(fresh), sampled(resumed)],
            "first_share": round(first / whole, 3),
            "fresh_run_s": fresh["Duration"], "resumed_run_s": resumed["Duration"],
            "resumed_share": round(resumed["Duration"] / fresh["Duration"], 3),
            "attempts": resumed["attempts"],
            "words": len(words(fresh["result"])),
            "words_differing": edit_distance(words(fresh["result"]),
                                             words(resumed["result"]))}


def job_segments(state, job_id):
    """The segments a finished job left in its whisperd's store."""
    import sqlite3
    with sqlite3.connect(state / "whisperd.sqlite3") as db:
        return [json.loads(doc) for doc, in db.execute(
            "SELECT doc FROM segments WHERE job_id = ? ORDER BY n", (job_id,))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--engine", choices=ENGINES, action="append")
    parser.add_argument("--kill-at", type=int, default=60, help="progress (%%) at kill -9")
    parser.add_argument("--model-dir", default=MODEL_DIR)
    parser.add_argument("--no-wait", action="store_true", help="measure at once, even "
                        "while a test suite runs")
    args = parser.parse_args()
    model_dir = ensure_models(args.model_dir)
    audio = recording(args.minutes, OUT / "audio")
    if not args.no_wait:
        wait_until_quiet()
    watch, rows = CpuWatch(), {}
    for engine in args.engine or ENGINES:
        rows[engine] = measure(engine, audio, model_dir, OUT / "scratch-stream", args.kill_at)
        print(engine, rows[engine], flush=True)
    seconds = audio_seconds(audio)
    print(f"\n{seconds / 60:.1f} min of recorded prompts, tiny.en, {machine()['cpu']}\n"
          "| engine | first segment | whole transcript | first / whole | fresh run | "
          "resumed run (killed at {0}%) | resumed / fresh | words differing |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|".format(args.kill_at))
    for engine, r in rows.items():
        print(f"| {engine} | {r['first_segment_s']:.1f} s | {r['whole_s']:.1f} s | "
              f"{r['first_share']:.3f} | {r['fresh_run_s']:.1f} s | {r['resumed_run_s']:.1f} s "
              f"| {r['resumed_share']:.2f} | {r['words_differing']} of {r['words']} |")
    text, foreign_s, foreign_share = watch.verdict()
    print("windows sampled at a temperature over 0 (fresh, resumed): " + ", ".join(
        f"{engine} {r['windows_sampled']}" for engine, r in rows.items()))
    print(f"\n{text}")
    (OUT / "stream.json").write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(),
        "audio_s": seconds, "kill_at": args.kill_at, "rows": rows,
        "foreign_cpu_s": foreign_s, "foreign_cpu_share": foreign_share}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
