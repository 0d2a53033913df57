"""Soak: many short jobs through a whisperd that is killed and restarted at random.

Submits --jobs short jobs (spoken by espeak-ng) to a whisperd running tiny.en, and at
random moments: kills it with SIGKILL, stops it with SIGTERM, restarts it, sends a file
that is not audio (it must be refused at once with 400: whisperd probes the audio before
its 201), sends a malformed body (refused with 400), or deletes a job that is still queued.
At the end it waits for every accepted job and prints what was accepted, finished, failed
and lost. Lost must be 0, and no accepted job may fail; the exit status is 1 otherwise.
Callbacks go to a receiver in this process (tools/harness.py's), which counts them per job.

    .venv/bin/python bench/soak.py                  # 300 jobs, a few minutes on 2 cores
    .venv/bin/python bench/soak.py --jobs 2000      # the long run
"""

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL_DIR, Daemon, Receiver, ensure_models, speak  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--faults", type=float, default=0.03,
                        help="chance of a fault after each submission")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model-dir", default=MODEL_DIR,
                        help="where tiny.en.pt is (made by tools/models.py if missing)")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="whisperd-soak-"))
    out = work / "out"
    out.mkdir()
    models = ensure_models(args.model_dir)
    audio = speak("Yes, thank you.", work / "yes.wav")
    garbage = work / "garbage.mp3"
    garbage.write_bytes(b"not audio\n" * 50)
    receiver = Receiver()

    daemon = Daemon(work / "state", models, "--history", "1000000", "--max-attempts", "1000",
                    "--callback-backoff", "0.5").start()
    accepted, deleted, faults = [], set(), collections.Counter()
    refused = collections.Counter()  # what was sent to be refused: how often it was
    unexpected = []                  # answers and final states that should not be
    started = time.monotonic()
    while len(accepted) < args.jobs:
        bad = rng.random() < 0.02
        status, _, job = daemon.request("POST", "/transcription/job", {
            "path": str(garbage if bad else audio), "output_path": str(out),
            "callback": receiver.url})
        if bad:
            faults["not audio"] += 1
            if status == 400:
                refused["not audio"] += 1
            else:
                unexpected.append(("not audio", status, job))
                if status == 201:
                    accepted.append(job["id"])
            continue
        if status == 201:
            accepted.append(job["id"])
        elif status == 503:  # shutting down or full: the client retries, as told
            time.sleep(0.2)
            continue
        else:
            raise SystemExit(f"unexpected answer {status}: {job}")
        if rng.random() < args.faults:
            fault = rng.choice(["kill -9", "SIGTERM", "malformed", "delete"])
            faults[fault] += 1
            if fault == "kill -9":
                daemon.kill()
                daemon.start()
            elif fault == "SIGTERM":
                if daemon.terminate() != 0:
                    raise SystemExit("SIGTERM did not exit 0")
                daemon.start()
            elif fault == "malformed":
                status, _, answer = daemon.request("POST", "/transcription/job",
                                                   raw=b'{"path": ')
                if status == 400:
                    refused["malformed"] += 1
                else:
                    unexpected.append(("malformed", status, answer))
            else:
                status, _, _ = daemon.request("DELETE", f"/transcription/job/{accepted[-1]}")
                if status == 200:
                    deleted.add(accepted[-1])

    finished, lost = collections.Counter(), []
    for job_id in accepted:
        if job_id in deleted:
            continue
        while True:
            status, _, job = daemon.request("GET", f"/transcription/job/{job_id}?wait=60")
            if status != 200 or job["status"] in ("COMPLETED", "FAILED"):
                break
        if status != 200:
            lost.append(job_id)
            continue
        finished[job["status"]] += 1
        if job["status"] == "FAILED":
            unexpected.append((job_id, job["status"], job["error"]))
    kept = [j for j in accepted if j not in deleted]

    def callbacks():
        return collections.Counter(job["id"] for job in receiver.jobs())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(1 for j in kept if callbacks()[j]) < len(kept):
        time.sleep(0.2)
    daemon.terminate()
    receiver.close()

    calls = callbacks()
    missing_callbacks = [j for j in kept if not calls[j]]
    repeated = sum(1 for j in accepted if calls[j] > 1)
    tracebacks = sum("Traceback" in line for line in daemon.lines)  # over every run
    if tracebacks:
        print(daemon.log, file=sys.stderr)
    print(f"jobs accepted      {len(accepted)}  (deleted while queued: {len(deleted)})")
    print(f"finished           {sum(finished.values())}  (COMPLETED {finished['COMPLETED']}, "
          f"FAILED {finished['FAILED']})")
    print(f"unexpected status  {len(unexpected)}")
    print(f"lost               {len(lost)}")
    print(f"callbacks missing  {len(missing_callbacks)}  (sent more than once: {repeated})")
    print(f"refused with 400   {sum(refused.values())}  (not audio: {refused['not audio']}, "
          f"malformed: {refused['malformed']})")
    print(f"faults injected    {dict(faults)}")
    print(f"tracebacks logged  {tracebacks}")
    print(f"wall time          {time.monotonic() - started:.0f} s")
    for item in unexpected[:10]:
        print("  unexpected:", item)
    return 1 if lost or unexpected or missing_callbacks or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
