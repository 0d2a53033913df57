"""GET /stats while the workers claim and run jobs, against the same nodes idle.

Starts --nodes whisperds (faster-whisper, tiny.en) on SQLite (one node) or on a PostgreSQL
server of the script's own (--store pg), times GET /stats on the first node every 50 ms
for --seconds while nothing runs (the baseline), then again while a feeder keeps four
short spoken jobs queued on every node, so that every worker claims, decodes and ends a
job about every second. Prints p50, p90, p99 and max of each, and their ratio.

    .venv/bin/python bench/claims.py                          # one node, SQLite
    .venv/bin/python bench/claims.py --nodes 3 --store pg     # three nodes, PostgreSQL
"""

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL_DIR, Daemon, ensure_models, print_machine, speak  # noqa: E402
from tools.harness import Postgres, wait_until  # noqa: E402


def timed(node, seconds):
    """Milliseconds of each GET /stats, one every 50 ms, for `seconds`."""
    times, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        begun = time.perf_counter()
        assert node.request("GET", "/stats", timeout=30)[0] == 200
        times.append((time.perf_counter() - begun) * 1000)
        time.sleep(0.05)
    return sorted(times)


def figures(times):
    at = {p: times[min(len(times) - 1, int(len(times) * p / 100))] for p in (50, 90, 99)}
    return {**{f"p{p}": round(v, 1) for p, v in at.items()}, "max": round(times[-1], 1),
            "answers": len(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--store", choices=("sqlite", "pg"), default="sqlite")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--model-dir", default=MODEL_DIR)
    args = parser.parse_args()
    if args.nodes > 1 and args.store != "pg":
        parser.error("several nodes share one queue on PostgreSQL: --store pg")
    work = Path(tempfile.mkdtemp(prefix="whisperd-claims-"))
    models = ensure_models(args.model_dir)
    audio = speak("Yes, thank you.", work / "yes.wav")
    print_machine()
    with contextlib.ExitStack() as stack:
        flags = []
        if args.store == "pg":
            database = stack.enter_context(Postgres(work / "postgres", database="claims"))
            flags = ["--store", database.url, "--lease", "3"]
        nodes = [Daemon(work / f"state{k}", models, *flags, "--engine", "faster-whisper",
                        "--node", f"node{k}").start() for k in range(args.nodes)]
        for node in nodes:
            stack.callback(node.stop)
            wait_until(lambda: node.request("GET", "/health")[2].get("worker_ready"))
        idle = timed(nodes[0], args.seconds)
        stop = threading.Event()

        def feed():
            while not stop.is_set():
                for node in nodes:
                    if node.stats()["Queued"] < 4:
                        node.submit(path=audio, output_path=work)
                time.sleep(0.1)
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        wait_until(lambda: nodes[0].stats()["Processed"] >= 2 * args.nodes)  # models loaded
        busy = timed(nodes[0], args.seconds)
        stop.set()
        feeder.join()
        processed = nodes[0].stats()["Processed"]
    idle_f, busy_f = figures(idle), figures(busy)
    print(f"GET /stats on node0 of {args.nodes} ({args.store}), {args.seconds:g} s each, "
          f"{processed} jobs ended meanwhile")
    print(f"{'':<12}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'max ms':>8}")
    for name, f in (("idle", idle_f), ("claiming", busy_f)):
        print(f"{name:<12}{f['p50']:>8}{f['p90']:>8}{f['p99']:>8}{f['max']:>8}")
    print(f"claiming / idle: p50 {busy_f['p50'] / idle_f['p50']:.1f}x, "
          f"p99 {busy_f['p99'] / idle_f['p99']:.1f}x")


if __name__ == "__main__":
    main()
