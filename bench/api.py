#!/usr/bin/env python3
"""whisperd's start-up, and GET /stats under load against a bare stdlib server, in one run.

Start-up: from starting whisperd.py to the first 200 from GET /health (polled every 2 ms),
--starts times. GET /stats: wrk at concurrency 16, HTTP/1.1 keep-alive, requests/s and p99,
"idle" (model loaded, nothing queued), "busy" (a job RUNNING throughout) and "streams" (busy,
with 100 clients following that job's event stream, reading what comes), each paired
with a run against a bare ThreadingHTTPServer in its own process (HTTP/1.1, Nagle off,
whisperd's /stats body byte for byte) under the same conditions; --rounds pairs per phase,
the median shown with whisperd's ratio to the baseline. Targets (bench/RESULTS.md): start-up
< 1 s; idle >= 5,000 req/s and p99 < 20 ms; busy p99 < 50 ms; 100 streams: busy's p99
within 1.5x. Needs wrk (apt-get install wrk).
    .venv/bin/python bench/api.py [--seconds 2 --starts 3 --rounds 1] [--no-wait]
Writes bench/out/api.json. The client shares the cores: compare one run's ratios, not runs.
"""

import argparse
import json
import re
import selectors
import shutil
import socket
import threading
import statistics
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MODEL_DIR, OUT, PYTHON, WHISPERD, CpuWatch, Daemon,  # noqa: E402
                     ensure_models, free_port, machine, make_set, speak, wait_until,
                     wait_until_quiet)


PHASES = ("idle", "busy", "streams")


def baseline(body):
    """`--baseline BODY`: answers BODY to every GET on a loopback port it prints."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version, disable_nagle_algorithm = "HTTP/1.1", True  # as whisperd's

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    ThreadingHTTPServer.request_queue_size = 128  # as whisperd's (in this process only)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_port, flush=True)
    server.serve_forever()


def wrk(port, seconds):
    """wrk at c16 on GET /stats: {"rps", "p99_ms", "errors"}."""
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/stats"],
                         capture_output=True, text=True, check=True).stdout
    number, unit = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out).groups()
    errors = re.findall(r"(?:connect|read|write|timeout|responses:) +(\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1)),
            "p99_ms": float(number) * {"us": 1e-3, "ms": 1, "s": 1e3}[unit],
            "errors": sum(map(int, errors))}


class Streams:
    """`count` clients of GET /transcription/job/ID/events on one port, each reading what
    comes (one thread for all, as a cheap client would); made once each has its first
    event (the streams are open: what is measured is their cost, not their opening)."""

    def __init__(self, port, job_id, count):
        self.selector, self.socks, self.stop = selectors.DefaultSelector(), [], False
        request = (f"GET /transcription/job/{job_id}/events HTTP/1.1\r\nHost: x\r\n"
                   f"Accept: text/event-stream\r\n\r\n").encode()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.socks.append(sock)
        waiting, deadline = set(self.socks), time.monotonic() + 60
        while waiting and time.monotonic() < deadline:
            for key, _ in self.selector.select(1.0):
                if key.fileobj.recv(65536):
                    waiting.discard(key.fileobj)
        assert not waiting, f"{len(waiting)} streams never began"
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        while not self.stop:
            for key, _ in self.selector.select(0.2):
                try:
                    key.fileobj.recv(65536)
                except OSError:
                    pass

    def close(self):
        self.stop = True
        self.reader.join()
        for sock in self.socks:
            sock.close()


def startup(model_dir, scratch):
    """Seconds from starting whisperd.py to the first 200 from GET /health."""
    port, started = free_port(), time.perf_counter()
    proc = subprocess.Popen([PYTHON, str(WHISPERD), "--port", str(port), "--state-dir",
                             str(scratch / f"startup-{port}"), "--model-dir", model_dir,
                             "--default-model", "tiny.en"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.002)
        raise RuntimeError("whisperd exited during start-up")
    finally:
        proc.terminate()
        proc.wait(60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="whisperd/baseline pairs")
    parser.add_argument("--starts", type=int, default=5, help="start-up runs")
    parser.add_argument("--model-dir", default=MODEL_DIR)
    parser.add_argument("--no-wait", action="store_true", help="measure at once, even "
                        "while a test suite runs")
    parser.add_argument("--baseline", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        return baseline(args.baseline.encode())
    if not shutil.which("wrk"):
        sys.exit("api.py needs wrk: apt-get install wrk")
    model_dir = ensure_models(args.model_dir)
    audio, scratch = OUT / "audio", OUT / "scratch-api"
    busy_wav = make_set(audio, [120], "busy")[0]
    shutil.rmtree(scratch, ignore_errors=True)
    tiny_wav = speak("Thank you.", scratch / "tiny.wav")
    if not args.no_wait:
        wait_until_quiet()
    began, watch = time.monotonic(), CpuWatch()

    starts = [startup(model_dir, scratch) for _ in range(args.starts)]
    print("start-up to the first answer: " + ", ".join(f"{t * 1000:.0f} ms" for t in starts))
    daemon = Daemon(scratch / "state", model_dir, "--shutdown-grace", "1").start()
    base, rows = None, {}
    try:
        daemon.completed(daemon.submit(path=tiny_wav)["id"])  # the model is loaded
        base = subprocess.Popen([PYTHON, __file__, "--baseline", json.dumps(daemon.stats())],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ports = {"whisperd": daemon.port, "baseline": int(base.stdout.readline())}
        for phase in PHASES:
            runs = {"whisperd": [], "baseline": []}
            for _ in range(args.rounds):
                for server, results in runs.items():
                    streams = None
                    if phase != "idle":  # one job runs and one waits behind it
                        while (stats := daemon.stats())["Running"] + stats["Queued"] < 2:
                            daemon.submit(path=busy_wav, output_path=scratch)
                        wait_until(lambda: daemon.stats()["Running"])
                    if phase == "streams":
                        running = next(j for j in daemon.request(
                            "GET", "/transcription/jobs")[2] if j["status"] == "RUNNING")
                        streams = Streams(daemon.port, running["id"], 100)
                    try:
                        results.append(wrk(ports[server], args.seconds))
                    finally:
                        if streams:
                            streams.close()
            for server, results in runs.items():
                rows[phase, server] = {key: statistics.median(r[key] for r in results)
                                       for key in ("rps", "p99_ms", "errors")}
    finally:
        if base:
            base.terminate()
            base.wait()
        daemon.stop()

    print(f"\nGET /stats, c16 keep-alive, wrk, {args.seconds} s a run, median of {args.rounds}"
          "\n| phase | whisperd req/s | p99 ms | baseline req/s | p99 ms | req/s ratio "
          "| p99 ratio | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for phase in PHASES:
        w, b = rows[phase, "whisperd"], rows[phase, "baseline"]
        w["rps_ratio"], w["p99_ratio"] = w["rps"] / b["rps"], w["p99_ms"] / b["p99_ms"]
        print(f"| {phase} | {w['rps']:.0f} | {w['p99_ms']:.2f} | {b['rps']:.0f} | "
              f"{b['p99_ms']:.2f} | {w['rps_ratio']:.2f} | {w['p99_ratio']:.2f} | "
              f"{w['errors']:g}, {b['errors']:g} |")
    idle, busy = rows["idle", "whisperd"], rows["busy", "whisperd"]
    streams = rows["streams", "whisperd"]
    targets = {"start-up < 1 s": max(starts) < 1,
               "GET /stats c16 idle >= 5,000 req/s": idle["rps"] >= 5000,
               "GET /stats c16 idle p99 < 20 ms": idle["p99_ms"] < 20,
               "GET /stats c16 busy p99 < 50 ms": busy["p99_ms"] < 50,
               "GET /stats c16 busy, 100 event streams: p99 within 1.5x of busy":
                   streams["p99_ms"] <= 1.5 * busy["p99_ms"]}
    print("\n" + "\n".join(f"{'PASS' if ok else 'MISS'}  {name}"
                           for name, ok in targets.items()))
    text, foreign_s, foreign_share = watch.verdict()
    print(f"\n{text}\nmeasured in {time.monotonic() - began:.0f} s; "
          f"results in {OUT / 'api.json'}")
    (OUT / "api.json").write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(),
        "seconds_each": args.seconds, "rounds": args.rounds, "startup_s": starts,
        "rows": {f"{phase} {server}": row for (phase, server), row in rows.items()},
        "targets": targets, "foreign_cpu_s": foreign_s, "foreign_cpu_share": foreign_share},
        indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
