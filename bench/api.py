#!/usr/bin/env python3
"""HTTP throughput and latency of whisperd, against a bare stdlib server in the same run.

What it measures
  - start-up: time from starting `whisperd.py` to its first answer on the port (a GET
    /health, polled every 2 ms on a port chosen beforehand), over --starts runs.
  - GET /stats and POST /transcription/job, HTTP/1.1 keep-alive, at concurrency 1, 16
    and 64 (closed loop: each connection sends its next request when the answer is in),
    reporting requests/s, p50 and p99 latency, and the CPU the server used.
      idle          the worker has nothing to do
      transcribing  a long job (spoken audio, minutes) is RUNNING the whole time
    POST needs a worker that is busy, or the posted jobs would be transcribed and load the
    CPU: so POST is measured only "transcribing", where a long job holds the worker and
    the posted jobs just wait in the queue (--max-queue is raised so none is refused).
    They point at a 1 s spoken file and are DELETEd after each measurement. Every POST is a
    durable SQLite insert (synchronous=FULL), so it includes an fsync.
  - the same GETs with "Connection: close" (a new connection, and a new server thread,
    per request), and a burst: 64 connections opened at once with one GET each, timed to
    the last answer; both show what thread-per-connection start-up costs. (wrk opens its
    connections as it starts, so its short runs at c64 include that start-up in their
    p99; the stdlib client connects before its measuring window opens.)
  - baseline: a bare http.server.ThreadingHTTPServer whose handler answers a small JSON
    (protocol_version "HTTP/1.1", disable_nagle_algorithm True), measured in the same run
    under the same conditions (idle, and while whisperd transcribes), so whisperd's figures
    are read as ratios to it.
  - reference (idle GET only): the same bytes from a one-thread asyncio server, to tell
    what in the tail latency comes from the thread-per-connection model and the GIL rather
    than from the machine or the client.
  Two load generators: `wrk` (C, epoll; used when installed: apt-get install wrk) and a
  stdlib one (selectors, one or two processes via multiprocessing so the client does not
  starve on one GIL). Client and server share the machine's cores: on a 2-core box the
  client's CPU is taken from the server, which is why wrk's figures are the ones the
  targets are judged on when it is there.

Targets, each PASS or MISS: start-up < 1 s; GET /stats at c16 keep-alive idle >= 5,000
req/s and p99 < 20 ms; p99 < 50 ms at c16 while transcribing. c64 is measured and
explained, not judged.

Run (from the repository root; about 4 minutes with wrk, 2 with --client python):
  .venv/bin/python bench/api.py                 # both clients when wrk is installed
  .venv/bin/python bench/api.py --client python --seconds 2 --quick
Options: --client wrk|python|both, --seconds per measurement, --model-dir (tiny.en, made by
tools/tiny_en.py; default $WHISPERD_MODEL_DIR else bench/out/models), --no-wait.
Prints a table (markdown) and PASS/MISS per target; writes bench/out/api.json.
Timings on a shared machine are noisy: compare the ratios of one run, not runs.
"""

import argparse
import json
import multiprocessing
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (OUT, PYTHON, ROOT, WHISPERD, CpuWatch, Daemon,  # noqa: E402
                     audio_seconds, machine, make_set, speak, wait_until_quiet)


# ---------------------------------------------------------------------------------------
# The baseline server
# ---------------------------------------------------------------------------------------

class BaselineHandler(BaseHTTPRequestHandler):
    """The least a stdlib server can do: read the request, answer a small JSON."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    body = json.dumps({"Queued": 0, "Running": 0, "Processed": 0}).encode()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def log_message(self, *args):
        pass


class BaselineServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # as whisperd's

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client hanging up is no news
            super().handle_error(request, client_address)


def baseline_main():
    """`--baseline-server`: serves on a free loopback port, prints it, runs until killed."""
    server = BaselineServer(("127.0.0.1", 0), BaselineHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def asyncio_main():
    """`--asyncio-server`: the same answer from one asyncio thread, no per-connection
    thread and no header parsing: a reference for what bounds the threaded servers' p99
    (measured idle, GET only)."""
    import asyncio
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(BaselineHandler.body)).encode() + b"\r\n\r\n" + BaselineHandler.body)

    async def handle(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()
    asyncio.run(serve())


# ---------------------------------------------------------------------------------------
# The stdlib load generator
# ---------------------------------------------------------------------------------------

def _client_process(host, port, request, connections, start_at, warmup, seconds, results):
    """Keeps `connections` connections busy (one request in flight on each) from
    start_at until the window ends; sends back (latencies in the window, errors)."""
    keep_alive = b"Connection: close" not in request
    selector = selectors.DefaultSelector()
    window = (start_at + warmup, start_at + warmup + seconds)
    latencies, errors = [], 0

    def connect():
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        return s

    state = {}  # socket -> [sent at, buffer]

    def send(s):
        state[s] = [time.perf_counter(), b""]
        s.send(request)  # small: goes out whole into an empty socket buffer
        selector.register(s, selectors.EVENT_READ)

    socks = [connect() for _ in range(connections)]
    while time.perf_counter() < start_at:
        time.sleep(0.001)
    for s in socks:
        send(s)
    while True:
        now = time.perf_counter()
        if now >= window[1]:
            break
        for key, _ in selector.select(timeout=window[1] - now):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            entry = state[s]
            entry[1] += chunk
            head, sep, rest = entry[1].partition(b"\r\n\r\n")
            if not chunk and not sep:
                errors += 1  # the server closed on us
                selector.unregister(s)
                s.close()
                s = connect()
                send(s)
                continue
            if not sep:
                continue
            match = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if len(rest) < (int(match.group(1)) if match else 0):
                continue
            done = time.perf_counter()
            if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                errors += 1
            if window[0] <= done < window[1]:
                latencies.append(done - entry[0])
            selector.unregister(s)
            if not keep_alive:
                s.close()
                s = connect()
            send(s)
    for s in list(state):
        s.close()
    results.put((latencies, errors))


def python_load(host, port, request, concurrency, seconds, warmup=0.5, processes=2):
    """Runs the stdlib client: up to `processes` processes, `concurrency` connections."""
    processes = max(1, min(processes, concurrency))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start_at = time.perf_counter() + 0.3 + concurrency * 0.002
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    procs = [context.Process(target=_client_process, args=(host, port, request, n, start_at,
                                                           warmup, seconds, results))
             for n in shares]
    for p in procs:
        p.start()
    latencies, errors = [], 0
    for _ in procs:
        lat, err = results.get(timeout=seconds + warmup + 60)
        latencies += lat
        errors += err
    for p in procs:
        p.join()
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 \
            if latencies else float("nan")
    return {"rps": len(latencies) / seconds, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "requests": len(latencies), "errors": errors}


def burst(host, port, connections, timeout=30.0):
    """Opens `connections` connections at once and sends one GET /stats on each: the
    seconds until each got its answer, sorted. The server accepts them one at a time and
    starts a thread for each, so this shows what thread-per-connection start-up costs."""
    request = f"GET /stats HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    started = time.perf_counter()
    socks = []
    for _ in range(connections):
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((host, port))  # completes in the kernel, before the server accepts
        s.sendall(request)
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
        socks.append(s)
    answered = []
    while len(answered) < connections and time.perf_counter() - started < timeout:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj.recv(65536):
                answered.append(time.perf_counter() - started)
            selector.unregister(key.fileobj)
    for s in socks:
        s.close()
    return sorted(answered)


# ---------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------

def _ms(value):
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk_load(host, port, method, path, body, concurrency, seconds, close=False):
    threads = 1 if concurrency == 1 else 2
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    with script:
        script.write(f"wrk.method = {json.dumps(method)}\n")
        if body:
            script.write(f"wrk.body = {json.dumps(body)}\n"
                         'wrk.headers["Content-Type"] = "application/json"\n')
        if close:
            script.write('wrk.headers["Connection"] = "close"\n')
    try:
        out = subprocess.run(["wrk", "-t", str(threads), "-c", str(concurrency),
                              "-d", f"{seconds}s", "--latency", "-s", script.name,
                              f"http://{host}:{port}{path}"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99,
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

def _pct(share):
    return "-" if share is None else f"{share:.0%}"


def cpu_seconds(pid):
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup(model_dir, scratch, runs):
    """Seconds from starting whisperd.py to the first answer on its port, per run."""
    times = []
    for i in range(runs):
        port = free_port()
        state = scratch / f"startup-{i}"
        started = time.perf_counter()
        proc = subprocess.Popen([PYTHON, str(WHISPERD), "--port", str(port),
                                 "--state-dir", str(state), "--model-dir", str(model_dir),
                                 "--default-model", "tiny.en"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                        if s.recv(64).startswith(b"HTTP/1.1 200"):
                            times.append(time.perf_counter() - started)
                            break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError("whisperd exited during start-up")
                    time.sleep(0.002)
        finally:
            proc.terminate()
            proc.wait(30)
    return times


class Run:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.clients = {"both": ["wrk", "python"], "wrk": ["wrk"],
                        "python": ["python"]}[args.client]
        if "wrk" in self.clients and not shutil.which("wrk"):
            print("wrk is not installed (apt-get install wrk): using the stdlib client only")
            self.clients = ["python"]

    def measure(self, server, name, pid, host, port, method, path, body, concurrency,
                phase, client, close=False):
        request = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   + ("Connection: close\r\n" if close else "")
                   + (f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                      if body else "") + "\r\n" + (body or "")).encode()
        cpu, started = cpu_seconds(pid), time.perf_counter()
        if client == "wrk":
            result = wrk_load(host, port, method, path, body, concurrency,
                              self.args.seconds, close)
        else:
            result = python_load(host, port, request, concurrency, self.args.seconds)
        result["server_cpu"] = (cpu_seconds(pid) - cpu) / (time.perf_counter() - started)
        if server == "whisperd" and phase == "transcribing":
            result["server_cpu"] = None  # it includes the transcription's threads
        row = {"server": server, "request": name, "c": concurrency, "phase": phase,
               "client": client, "keep_alive": not close, **result}
        self.rows.append(row)
        print(f"  {server:9} {name:22} c={concurrency:<3} {phase:12} {client:6} "
              f"{row['rps']:8.0f} req/s  p50 {row['p50_ms']:6.2f} ms  p99 "
              f"{row['p99_ms']:7.2f} ms  server CPU {_pct(row['server_cpu'])}"
              + (f"  errors {row['errors']}" if row["errors"] else ""), flush=True)
        return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", choices=("both", "wrk", "python"), default="both")
    parser.add_argument("--seconds", type=int, default=3, help="per measurement")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--quick", action="store_true", help="one start-up run, no "
                        "Connection: close rows")
    parser.add_argument("--starts", type=int, default=5, help="start-up runs")
    parser.add_argument("--model-dir", default=os.environ.get("WHISPERD_MODEL_DIR")
                        or str(OUT / "models"))
    parser.add_argument("--json", default=str(OUT / "api.json"))
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for running test suites to end")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--asyncio-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        return baseline_main()
    if args.asyncio_server:
        return asyncio_main()
    levels = [int(c) for c in args.concurrency.split(",")]
    args.model_dir = os.path.abspath(args.model_dir)
    subprocess.run([PYTHON, str(ROOT / "tools" / "tiny_en.py"), args.model_dir], check=True)
    audio = OUT / "audio"
    # a long job keeps the worker busy: about 10 minutes of speech (a minute or more
    # of transcription), submitted again whenever it ends
    long_wav = make_set(audio, [600], "long")[0]
    tiny_wav = speak("Thank you.", audio / "api-tiny.wav")
    scratch = OUT / "scratch-api"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "out").mkdir(parents=True)
    if not args.no_wait:
        wait_until_quiet()
    run = Run(args)
    began, watch = time.monotonic(), CpuWatch()

    print("start-up: process start to first answer on the port", flush=True)
    starts = startup(args.model_dir, scratch, 1 if args.quick else args.starts)
    print("  " + ", ".join(f"{t * 1000:.0f} ms" for t in starts), flush=True)

    base = subprocess.Popen([PYTHON, __file__, "--baseline-server"], stdout=subprocess.PIPE,
                            text=True)
    aio = subprocess.Popen([PYTHON, __file__, "--asyncio-server"], stdout=subprocess.PIPE,
                           text=True)
    base_port, aio_port = int(base.stdout.readline()), int(aio.stdout.readline())
    daemon = Daemon(scratch / "state", args.model_dir, ["--max-queue", "1000000"]).start()
    host = daemon.host
    servers = {"whisperd": (daemon.pid, daemon.port), "baseline": (base.pid, base_port),
               "asyncio": (aio.pid, aio_port)}
    post_body = json.dumps({"path": str(tiny_wav), "output_path": str(scratch / "out"),
                            "format": "txt"})
    long_job = {"id": None}

    def keep_busy():
        """Makes sure the long job is RUNNING (submits it again if it ended)."""
        if long_job["id"]:
            status, job = daemon.http.request("GET", f"/transcription/job/{long_job['id']}")
            if status == 200 and job["status"] in ("RUNNING", "QUEUED"):
                return
        long_job["id"] = daemon.submit(long_wav, scratch / "out")["id"]
        deadline = time.monotonic() + 60
        while daemon.http.request("GET", f"/transcription/job/{long_job['id']}")[1][
                "status"] != "RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError("the long job did not start")
            time.sleep(0.05)

    def drop_queued():
        _, jobs = daemon.http.request("GET", "/transcription/jobs")
        for job in jobs:
            if job["status"] == "QUEUED":
                daemon.http.request("DELETE", f"/transcription/job/{job['id']}")

    try:
        # the worker imports its libraries and loads the model: let it, then it is idle
        daemon.finished(daemon.submit(tiny_wav, scratch / "out")["id"])
        print(f"burst: {max(levels)} new connections at once, one GET /stats each (idle)",
              flush=True)
        bursts = {}
        for server in ("whisperd", "baseline", "asyncio"):
            runs = [burst(host, servers[server][1], max(levels)) for _ in range(3)]
            runs.sort(key=lambda times: times[-1])
            times = runs[1]  # the median run, by its last answer
            bursts[server] = {"first_ms": times[0] * 1000,
                              "median_ms": times[len(times) // 2] * 1000,
                              "last_ms": times[-1] * 1000, "answered": len(times)}
            print(f"  {server:9} first answer {times[0] * 1000:6.2f} ms, median "
                  f"{bursts[server]['median_ms']:6.2f} ms, last {times[-1] * 1000:6.2f} ms",
                  flush=True)
            time.sleep(0.5)  # let the threads of the closed connections end
        for phase in ("idle", "transcribing"):
            print(f"{phase}:", flush=True)
            for client in run.clients:
                for c in levels:
                    for server in ("whisperd", "baseline") + (
                            ("asyncio",) if phase == "idle" else ()):
                        if phase == "transcribing":
                            keep_busy()
                        pid, port = servers[server]
                        run.measure(server, "GET /stats", pid, host, port, "GET", "/stats",
                                    None, c, phase, client)
                if not args.quick:
                    for server in ("whisperd", "baseline"):
                        if phase == "transcribing":
                            keep_busy()
                        pid, port = servers[server]
                        run.measure(server, "GET /stats (close)", pid, host, port, "GET",
                                    "/stats", None, 16, phase, client, close=True)
                if phase == "transcribing":
                    for c in levels:
                        for server in ("whisperd", "baseline"):
                            keep_busy()
                            pid, port = servers[server]
                            run.measure(server, "POST /transcription/job", pid, host,
                                        port, "POST", "/transcription/job", post_body, c,
                                        phase, client)
                            if server == "whisperd":
                                drop_queued()
    finally:
        daemon.stop()
        for server in (base, aio):
            server.terminate()
            server.wait()

    result = report(run.rows, starts, run.clients[0])
    result["burst"] = bursts
    result.update(machine=machine(), seconds_each=args.seconds,
                  bench_wall_s=round(time.monotonic() - began, 1),
                  when=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  long_audio_s=round(audio_seconds(long_wav), 1))
    text, result["foreign_cpu_s"], result["foreign_cpu_share"] = watch.verdict()
    print(f"\n{text}")
    print(f"\nmeasured in {result['bench_wall_s']:.0f} s; results in {args.json}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def report(rows, starts, judge_client):
    print("\n| request | c | phase | client | whisperd req/s | p50 ms | p99 ms | server CPU "
          "| baseline req/s | p50 ms | p99 ms | req/s vs baseline |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for w in rows:
        if w["server"] != "whisperd":
            continue
        b = next(r for r in rows if r["server"] == "baseline" and all(
            r[k] == w[k] for k in ("request", "c", "phase", "client")))
        table.append((w, b))
        print(f"| {w['request']} | {w['c']} | {w['phase']} | {w['client']} | {w['rps']:.0f} | "
              f"{w['p50_ms']:.2f} | {w['p99_ms']:.2f} | {_pct(w['server_cpu'])} | "
              f"{b['rps']:.0f} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | "
              f"{w['rps'] / b['rps']:.2f} |")
    references = [r for r in rows if r["server"] == "asyncio"]
    if references:
        print("\nreference: the same answer from one asyncio thread (no thread per "
              "connection, no header parsing), idle")
        print("| request | c | client | req/s | p50 ms | p99 ms | server CPU |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in references:
            print(f"| {r['request']} | {r['c']} | {r['client']} | {r['rps']:.0f} | "
                  f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {_pct(r['server_cpu'])} |")
    targets = []

    def target(name, ok, text):
        targets.append({"target": name, "pass": ok, "text": text})
        print(f"{'PASS' if ok else 'MISS'}  {name}: {text}")

    def find(phase, c=16, request="GET /stats", client=judge_client):
        return next((w for w, _ in table if (w["request"], w["c"], w["phase"],
                                             w["client"]) == (request, c, phase, client)),
                    None)

    print(f"\n(targets judged on the {judge_client} client's figures)")
    worst = max(starts)
    target("start-up < 1 s", worst < 1.0, f"first answer after {min(starts) * 1000:.0f} to "
           f"{worst * 1000:.0f} ms over {len(starts)} starts")
    idle = find("idle")
    if idle:
        target("GET /stats c16 keep-alive idle >= 5,000 req/s", idle["rps"] >= 5000,
               f"{idle['rps']:.0f} req/s")
        target("GET /stats c16 keep-alive idle p99 < 20 ms", idle["p99_ms"] < 20,
               f"p99 {idle['p99_ms']:.2f} ms (p50 {idle['p50_ms']:.2f} ms)")
    busy = find("transcribing")
    if busy:
        target("GET /stats c16 keep-alive while transcribing p99 < 50 ms",
               busy["p99_ms"] < 50, f"p99 {busy['p99_ms']:.2f} ms, {busy['rps']:.0f} req/s")
    return {"rows": rows, "startup_s": starts, "targets": targets}


if __name__ == "__main__":
    sys.exit(main())
