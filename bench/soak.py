"""Soak: many short jobs through a whisperd that is killed and restarted at random.

Submits --jobs short jobs (spoken by espeak-ng) to a whisperd running tiny.en, and at
random moments: kills it with SIGKILL, stops it with SIGTERM, restarts it, submits a job
whose audio does not decode (it must end FAILED), sends a malformed body (it must be
refused), or deletes a job that is still queued. At the end it waits for every accepted job
and prints what was accepted, finished, failed and lost. Lost must be 0; the exit status is
1 otherwise. Callbacks go to a receiver in this process, which counts them per job.

    .venv/bin/python bench/soak.py                  # 300 jobs, a few minutes on 2 cores
    .venv/bin/python bench/soak.py --jobs 2000      # the long run
"""

import argparse
import collections
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Daemon:
    def __init__(self, state, models, out):
        self.state, self.models, self.out, self.proc = state, models, out, None
        self.tracebacks = 0  # over every run of the daemon

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "whisperd.py"), "--port", "0", "--state-dir",
             str(self.state), "--model-dir", str(self.models), "--default-model", "tiny.en",
             "--history", "1000000", "--max-attempts", "1000", "--callback-backoff", "0.5"],
            stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            found = re.search(r"listening on http://[\d.]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()

    def _drain(self, proc):
        for line in proc.stderr:
            if "Traceback" in line:
                self.tracebacks += 1
                print(line, end="", file=sys.stderr)

    def request(self, method, path, body=None, raw=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        connection.request(method, path, body=raw if raw is not None else json.dumps(body))
        response = connection.getresponse()
        answer = json.loads(response.read() or b"null")
        connection.close()
        return response.status, answer


class Receiver(ThreadingHTTPServer):
    def __init__(self):
        self.calls = collections.Counter()
        receiver = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.calls[job["id"]] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Hook)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--faults", type=float, default=0.03,
                        help="chance of a fault after each submission")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="whisperd-soak-"))
    models, out = work / "models", work / "out"
    out.mkdir()
    subprocess.run([sys.executable, str(ROOT / "tools" / "tiny_en.py"), str(models)], check=True,
                   stdout=subprocess.DEVNULL)
    audio = work / "yes.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(audio), "Yes, thank you."], check=True)
    garbage = work / "garbage.mp3"
    garbage.write_bytes(b"not audio\n" * 50)
    receiver = Receiver()
    hook = f"http://127.0.0.1:{receiver.server_port}/hook"

    daemon = Daemon(work / "state", models, out)
    daemon.start()
    accepted, expected_failures, deleted, refused, faults = [], set(), set(), 0, collections.Counter()
    started = time.monotonic()
    while len(accepted) < args.jobs:
        bad = rng.random() < 0.02
        status, job = daemon.request("POST", "/transcription/job", {
            "path": str(garbage if bad else audio), "output_path": str(out), "callback": hook})
        if status == 201:
            accepted.append(job["id"])
            if bad:
                expected_failures.add(job["id"])
        elif status == 503:  # shutting down or full: the client retries, as told
            time.sleep(0.2)
            continue
        else:
            raise SystemExit(f"unexpected answer {status}: {job}")
        if rng.random() < args.faults:
            fault = rng.choice(["kill -9", "SIGTERM", "malformed", "delete"])
            faults[fault] += 1
            if fault == "kill -9":
                daemon.proc.kill()
                daemon.proc.wait()
                daemon.start()
            elif fault == "SIGTERM":
                daemon.proc.send_signal(signal.SIGTERM)
                if daemon.proc.wait(120) != 0:
                    raise SystemExit("SIGTERM did not exit 0")
                daemon.start()
            elif fault == "malformed":
                status, _ = daemon.request("POST", "/transcription/job", raw=b'{"path": ')
                refused += status == 400
            else:
                status, _ = daemon.request("DELETE", f"/transcription/job/{accepted[-1]}")
                if status == 200:
                    deleted.add(accepted[-1])

    finished = collections.Counter()
    lost, unexpected = [], []
    for job_id in accepted:
        if job_id in deleted:
            continue
        while True:
            status, job = daemon.request("GET", f"/transcription/job/{job_id}?wait=60")
            if status != 200 or job["status"] in ("COMPLETED", "FAILED"):
                break
        if status != 200:
            lost.append(job_id)
            continue
        finished[job["status"]] += 1
        if (job["status"] == "FAILED") != (job_id in expected_failures):
            unexpected.append((job_id, job["status"], job["error"]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and \
            sum(1 for j in accepted if j not in deleted and receiver.calls[j]) < \
            len(accepted) - len(deleted):
        time.sleep(0.2)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(120)

    missing_callbacks = [j for j in accepted if j not in deleted and not receiver.calls[j]]
    repeated = sum(1 for j in accepted if receiver.calls[j] > 1)
    print(f"jobs accepted      {len(accepted)}  (deleted while queued: {len(deleted)})")
    print(f"finished           {sum(finished.values())}  (COMPLETED {finished['COMPLETED']}, "
          f"FAILED {finished['FAILED']}, of which expected {len(expected_failures - deleted)})")
    print(f"unexpected status  {len(unexpected)}")
    print(f"lost               {len(lost)}")
    print(f"callbacks missing  {len(missing_callbacks)}  (sent more than once: {repeated})")
    print(f"malformed refused  {refused}")
    print(f"faults injected    {dict(faults)}")
    print(f"tracebacks logged  {daemon.tracebacks}")
    print(f"wall time          {time.monotonic() - started:.0f} s")
    for item in unexpected[:10]:
        print("  unexpected:", item)
    return 1 if lost or unexpected or missing_callbacks else 0


if __name__ == "__main__":
    sys.exit(main())
