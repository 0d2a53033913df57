"""Soak: many short jobs through whisperd daemons that are killed and restarted at random.

Submits --jobs short jobs (spoken by espeak-ng) to whisperd running tiny.en, and at random
moments: kills a daemon with SIGKILL, stops it with SIGTERM (it must exit 0), restarts it,
sends a file that is not audio (it must be refused at once with 400: whisperd probes the
audio before its 201), sends a malformed body (refused with 400), deletes a job that is
still queued, or cancels a job (one the node runs, or one of the last accepted). At the
end it waits for every accepted job and prints what was accepted, finished, failed and
lost, and how many jobs had their end recorded twice ("run twice": two "job ID completed
in" lines in the logs). Lost and run twice must be 0, no accepted job may miss its
callback, and none may fail but those cancelled, which must end FAILED "cancelled" (never
COMPLETED); the exit status is 1 otherwise. Callbacks go
to a receiver in this process (tools/harness.py's), which counts them per job; a callback
sent more than once is allowed (at least once) and only reported.

One node (the default): one daemon on SQLite, engine openai-whisper unless --engine says.
--nodes N (N > 1): a PostgreSQL server of the script's own (tools/harness.py's Postgres,
in the work folder) and N daemons on it (--store URL --lease 3, engine faster-whisper
unless --engine says). Each daemon has a state folder of its own and a stable --node
nodeK. Each job goes to a random live node, and again while the answer is 503 (full, or
shutting down) or none came (down: another node, or the same once it is back). A fault
picks a random node (with several, never the last one up): kill -9, then a restart at
once or after a short random delay (past the lease or not), or SIGTERM, then a restart.
Every node is up again before the final wait; the node logs are kept in the work folder
(printed at the end). Meanwhile GET /stats is timed every 50 ms on a random live node (its
p50, p99 and max while the nodes claim and run jobs; answers of nodes whose workers are
not ready yet after a start are counted apart).

    .venv/bin/python bench/soak.py                  # 300 jobs, a few minutes on 2 cores
    .venv/bin/python bench/soak.py --jobs 2000      # the long run
    .venv/bin/python bench/soak.py --jobs 1000 --nodes 3 --json bench/results/soak-3nodes.json
"""

import argparse
import collections
import contextlib
import http.client
import json
import random
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MODEL_DIR, CpuWatch, Daemon, Receiver, ensure_models,  # noqa: E402
                     print_machine, speak)
from tools.harness import Postgres  # noqa: E402  (_common puts the repository on the path)

COMPLETED = re.compile(r"job (\S+) completed in ")
RUNNING = re.compile(r"job (\S+) running on ")
COMMON_FLAGS = ["--history", "1000000", "--max-attempts", "1000", "--callback-backoff", "0.5"]


def completions(lines):
    """{job id: how many times its end was recorded as COMPLETED} over `lines`."""
    found = collections.Counter()
    for line in lines:
        hit = COMPLETED.search(line)
        if hit:
            found[hit.group(1)] += 1
    return found


def wait_for_callbacks(receiver, kept, timeout=120):
    def count():
        calls = collections.Counter(job["id"] for job in receiver.jobs())
        return sum(1 for j in kept if calls[j])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and count() < len(kept):
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------
# The daemons: one on SQLite, or several on one PostgreSQL
# ---------------------------------------------------------------------------------------

class Node:
    """One whisperd of the cluster, and where it is in its life: "up", "stopping" (sent
    SIGTERM, not yet gone), "starting" (down, or starting; a thread brings it up) or
    "broken" (a start failed)."""

    def __init__(self, name, daemon):
        self.name, self.daemon = name, daemon
        self.state, self.thread, self.starts, self.error = "starting", None, 0, None
        self.exits = []  # exit status after each SIGTERM
        self.failures = []  # why a start failed, each time one did

    def bring_up(self, delay=0.0, stop_first=False):
        """In a thread: waits for the SIGTERM'd process to leave (stop_first), sleeps
        `delay` seconds, starts the daemon, and marks the node up."""
        self.state = "stopping" if stop_first else "starting"

        def run():
            try:
                if stop_first:
                    self.exits.append(self.daemon.proc.wait(300))
                    self.state = "starting"
                time.sleep(delay)
                self.daemon.start()
                self.starts += 1
                self.state = "up"
            except Exception as e:  # noqa: BLE001 - reported, and the run fails
                self.error, self.state = f"{type(e).__name__}: {e}", "broken"
                self.failures.append(self.error)
        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()

    def settle(self):
        if self.thread is not None:
            self.thread.join()


def soak(args, rng, work, models, audio, garbage, receiver, out, started):
    with contextlib.ExitStack() as stack:
        flags = []
        if args.nodes > 1:
            database = stack.enter_context(Postgres(work / "postgres", database="soak"))
            flags = ["--store", database.url, "--lease", f"{args.lease:g}"]
            print(f"PostgreSQL {database.bindir} at {database.url}; {args.nodes} nodes, "
                  f"engine {args.engine}, --lease {args.lease:g}", flush=True)
        nodes = [Node(f"node{k}", Daemon(work / f"state-node{k}", models, *flags, "--engine",
                                         args.engine, "--node", f"node{k}", *COMMON_FLAGS))
                 for k in range(1, args.nodes + 1)]
        return _soak(args, rng, work, nodes, audio, garbage, receiver, out, started)


def _soak(args, rng, work, nodes, audio, garbage, receiver, out, started):
    for node in nodes:
        node.bring_up()
    for node in nodes:
        node.settle()
    broken = [n for n in nodes if n.state != "up"]
    if broken:
        raise SystemExit(f"{broken[0].name} did not start: {broken[0].error}")

    accepted, deleted, cancelled, faults = [], set(), set(), collections.Counter()
    refused = collections.Counter()
    redirects = collections.Counter()  # submissions sent again elsewhere, by why
    unexpected = []
    submitted_to = collections.Counter()

    def up():
        return [n for n in nodes if n.state == "up"]

    # GET /stats, timed from the outside (a new connection each, as a monitor asks it)
    # every 50 ms on a random live node, for as long as the nodes claim and run jobs;
    # apart, the answers of nodes whose workers were not ready yet (a node importing its
    # engine after a start holds the GIL for seconds: that is start-up, not claiming).
    stats_ms, starting_ms, probing = [], [], threading.Event()
    ready = {}  # node name -> its start count once its workers were seen ready

    def probe_stats():
        while not probing.wait(0.05):
            live = up()
            if not live:
                continue
            node = rng_probe.choice(live)
            with contextlib.suppress(http.client.HTTPException, OSError):
                starts = node.starts
                begun = time.perf_counter()
                if node.daemon.request("GET", "/stats", timeout=10)[0] == 200:
                    (stats_ms if ready.get(node.name) == starts else starting_ms).append(
                        (time.perf_counter() - begun) * 1000)
                if ready.get(node.name) != starts and node.daemon.request(
                        "GET", "/health", timeout=10)[2].get("worker_ready"):
                    ready[node.name] = starts

    rng_probe = random.Random(args.seed + 1)
    prober = threading.Thread(target=probe_stats, name="stats probe", daemon=True)
    prober.start()

    def request(node, method, path, body=None, raw=None):
        """(status, answer), or (None, why) when the node did not answer."""
        try:
            status, _, answer = node.daemon.request(method, path, body, raw=raw, timeout=120)
            return status, answer
        except ConnectionRefusedError:
            return None, "refused"
        except (http.client.HTTPException, OSError) as e:  # reset, timed out...
            return None, f"{type(e).__name__}"

    def submit(body):
        """Posts to random live nodes until one answers other than 503 or not at all;
        returns (node, status, answer)."""
        while True:
            live = [n for n in nodes if n.state in ("up", "stopping")] or up()
            if not live:
                time.sleep(0.1)
                continue
            node = rng.choice(live)
            state = node.state
            status, answer = request(node, "POST", "/transcription/job", body)
            if status not in (None, 503):
                return node, status, answer
            redirects[f"{answer if status is None else 503} ({state})"] += 1
            if status is None and state == "up":  # a node we left alone did not answer
                unexpected.append(("POST without an answer", node.name, state, answer))
            if len(live) == 1 or (state == "up" and node.state == "up"):
                time.sleep(0.2)  # nowhere else to go, or it is full: a moment first

    while len(accepted) < args.jobs:
        bad = rng.random() < 0.02
        node, status, job = submit({"path": str(garbage if bad else audio),
                                    "output_path": str(out), "callback": receiver.url})
        if bad:
            faults["not audio"] += 1
            if status == 400:
                refused["not audio"] += 1
            else:
                unexpected.append(("not audio", node.name, status, job))
                if status == 201:
                    accepted.append(job["id"])
            continue
        if status != 201:
            raise SystemExit(f"unexpected answer {status} from {node.name}: {job}")
        accepted.append(job["id"])
        submitted_to[node.name] += 1
        if rng.random() >= args.faults:
            continue
        fault = rng.choice(["kill -9", "SIGTERM", "malformed", "delete", "cancel"])
        candidates = up()
        if fault in ("kill -9", "SIGTERM") and len(nodes) > 1 and len(candidates) < 2:
            faults[f"{fault} skipped (one node up)"] += 1
            continue
        faults[fault] += 1
        target = rng.choice(candidates)
        if fault == "kill -9":
            target.daemon.kill()
            target.bring_up(delay=0.0 if rng.random() < 0.5 else rng.uniform(0.5, 3 * args.lease))
        elif fault == "SIGTERM":
            target.daemon.proc.send_signal(signal.SIGTERM)
            target.bring_up(stop_first=True)
        elif fault == "malformed":
            status, answer = request(target, "POST", "/transcription/job", raw=b'{"path": ')
            if status == 400:
                refused["malformed"] += 1
            else:
                unexpected.append(("malformed", target.name, status, answer))
        elif fault == "cancel":
            status, health = request(target, "GET", "/health")  # half the time, a run
            running = [j for w in (health.get("workers", []) if status == 200 else [])
                       for j in w["running"]]
            victim = rng.choice(running) if running and rng.random() < 0.5 else \
                rng.choice([j for j in accepted[-8:] if j not in deleted])
            status, answer = request(target, "POST", f"/transcription/job/{victim}/cancel")
            if status in (200, 202):
                cancelled.add(victim)
                faults[f"cancel answered {status}"] += 1
            elif status != 409:  # 409: it had finished
                unexpected.append(("cancel", target.name, status, answer))
        else:
            status, answer = request(target, "DELETE", f"/transcription/job/{accepted[-1]}")
            if status == 200:
                deleted.add(accepted[-1])
            elif status not in (409,):
                unexpected.append(("delete", target.name, status, answer))
    submitting_s = time.monotonic()

    # Every node up again, then every accepted job to its end (asked of any node).
    for node in nodes:
        node.settle()
        if node.state != "up":
            node.bring_up()
            node.settle()
        if node.state != "up":
            raise SystemExit(f"{node.name} did not start again: {node.error}")
    finished, lost, stuck = collections.Counter(), [], []
    kept = [j for j in accepted if j not in deleted]
    progress = time.monotonic()
    for job_id in kept:
        while True:
            status, job = request(rng.choice(nodes), "GET",
                                  f"/transcription/job/{job_id}?wait=60")
            if status == 200 and job["status"] in ("COMPLETED", "FAILED"):
                progress = time.monotonic()
                finished[job["status"]] += 1
                if job_id in cancelled and not (job["status"] == "FAILED" and
                                                "cancelled" in job["error"]):
                    unexpected.append((job_id, "cancelled, yet", job["status"]))
                elif job["status"] == "FAILED" and job_id not in cancelled:
                    unexpected.append((job_id, job["status"], job["error"]))
                break
            if status == 404:
                lost.append(job_id)
                break
            if status != 200:
                unexpected.append(("GET", job_id, status, job))
                time.sleep(1)
            if time.monotonic() - progress > 900:  # nothing ended for 15 minutes
                stuck.append((job_id, job))
                break
    probing.set()
    prober.join()
    print(f"  submitting took {submitting_s - started:.0f} s; every job ended "
          f"{time.monotonic() - submitting_s:.0f} s later", flush=True)
    wait_for_callbacks(receiver, kept)
    for node in nodes:
        node.daemon.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        node.exits.append(node.daemon.proc.wait(300))
    time.sleep(0.5)  # the log readers reach the end
    logs = []
    for node in nodes:
        path = work / f"{node.name}.log"
        path.write_text(node.daemon.log)
        logs.append(str(path))
        bad_exits = [rc for rc in node.exits if rc != 0]
        if bad_exits:
            unexpected.append((node.name, "SIGTERM exit status", bad_exits))
        for why in node.failures:
            unexpected.append((node.name, "a start failed", why[:500]))
    lines = [line for node in nodes for line in node.daemon.lines]
    per_node = {}
    for node in nodes:
        node_lines = node.daemon.lines
        per_node[node.name] = {
            "starts": node.starts, "submitted": submitted_to[node.name],
            "completed": sum(completions(node_lines).values()),
            "runs started": sum(1 for line in node_lines if RUNNING.search(line)),
            "tracebacks": sum("Traceback" in line for line in node_lines)}
    return dict(accepted=accepted, deleted=deleted, cancelled=cancelled, finished=finished,
                lost=lost, stuck=stuck,
                unexpected=unexpected, refused=refused, faults=faults, lines=lines,
                logs=logs, kept=kept, nodes=per_node, redirects=redirects,
                stats_ms=sorted(stats_ms), starting_ms=sorted(starting_ms))


# ---------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--faults", type=float, default=0.03,
                        help="chance of a fault after each submission")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model-dir", default=MODEL_DIR,
                        help="where tiny.en.pt is (made by tools/models.py if missing)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="1: one daemon on SQLite; more: that many on one PostgreSQL")
    parser.add_argument("--engine", choices=("openai-whisper", "faster-whisper"),
                        help="default: openai-whisper for one node, faster-whisper for more")
    parser.add_argument("--lease", type=float, default=3.0,
                        help="the nodes' --lease, in seconds (several nodes)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.nodes < 1:
        parser.error("--nodes must be 1 or more")
    args.engine = args.engine or ("openai-whisper" if args.nodes == 1 else "faster-whisper")
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="whisperd-soak-"))
    out = work / "out"
    out.mkdir()
    models = ensure_models(args.model_dir)
    audio = speak("Yes, thank you.", work / "yes.wav")
    garbage = work / "garbage.mp3"
    garbage.write_bytes(b"not audio\n" * 50)
    receiver = Receiver()
    about = print_machine()
    print(f"soak: {args.jobs} jobs, {args.nodes} node(s), engine {args.engine}, faults "
          f"{args.faults:g} a submission, seed {args.seed}; work folder {work}", flush=True)

    watch = CpuWatch()
    started = time.monotonic()
    r = soak(args, rng, work, models, audio, garbage, receiver, out, started)
    receiver.close()
    wall = time.monotonic() - started

    calls = collections.Counter(job["id"] for job in receiver.jobs())
    accepted, kept = r["accepted"], r["kept"]
    missing_callbacks = [j for j in kept if not calls[j]]
    repeated = sum(1 for j in accepted if calls[j] > 1)
    ends = completions(r["lines"])
    twice = {j: n for j, n in ends.items() if n > 1}
    deleted_ran = [j for j in r["deleted"] if ends[j]]
    starts = collections.Counter(m.group(1) for line in r["lines"]
                                 if (m := RUNNING.search(line)))
    reruns = sum(1 for j in accepted if starts[j] > 1)
    fenced = sum("ended here after another node took it over" in line for line in r["lines"])
    lapsed = sum("stopped renewing its lease" in line for line in r["lines"])
    tracebacks = sum("Traceback" in line for line in r["lines"])  # over every run
    finished, unexpected = r["finished"], r["unexpected"]
    if tracebacks:
        for line_no, line in enumerate(r["lines"]):
            if "Traceback" in line:
                print("".join(r["lines"][max(0, line_no - 5):line_no + 25]), file=sys.stderr)
    text, foreign_s, foreign_share = watch.verdict()

    print(f"jobs accepted      {len(accepted)}  (deleted while queued: {len(r['deleted'])}, "
          f"cancelled: {len(r['cancelled'])})")
    print(f"finished           {sum(finished.values())}  (COMPLETED {finished['COMPLETED']}, "
          f"FAILED {finished['FAILED']})")
    print(f"unexpected status  {len(unexpected)}")
    print(f"lost               {len(r['lost'])}" + (f"  (and {len(r['stuck'])} never ended)"
                                                  if r["stuck"] else ""))
    print(f"run twice          {len(twice)}  (end recorded twice; runs started again after "
          f"a kill or a lapsed lease: {reruns}; ends refused to a late node: {fenced}; "
          f"leases reaped: {lapsed})")
    if deleted_ran:
        print(f"deleted yet run    {len(deleted_ran)}")
    print(f"callbacks missing  {len(missing_callbacks)}  (sent more than once: {repeated})")
    print(f"refused with 400   {sum(r['refused'].values())}  (not audio: "
          f"{r['refused']['not audio']}, malformed: {r['refused']['malformed']})")
    print(f"faults injected    {dict(r['faults'])}")
    if r["redirects"]:
        print(f"sent again         {dict(r['redirects'])}")
    for name, figures in r["nodes"].items():
        print(f"  {name}: {figures}")
    print(f"tracebacks logged  {tracebacks}")
    stats_ms, starting_ms = r["stats_ms"], r["starting_ms"]
    percentile = {p: stats_ms[min(len(stats_ms) - 1, int(len(stats_ms) * p / 100))]
                  for p in (50, 99)} if stats_ms else {50: None, 99: None}
    print(f"GET /stats         {len(stats_ms)} answers while the nodes worked: p50 "
          f"{percentile[50] or 0:.1f} ms, p99 {percentile[99] or 0:.1f} ms, max "
          f"{stats_ms[-1] if stats_ms else 0:.1f} ms; {len(starting_ms)} more from nodes "
          f"still starting (max {starting_ms[-1] if starting_ms else 0:.0f} ms)")
    print(f"wall time          {wall:.0f} s")
    print(f"logs               {', '.join(r['logs'])}")
    print(text)
    for item in unexpected[:10]:
        print("  unexpected:", item)
    for job_id, count in list(twice.items())[:10]:
        print(f"  run twice: {job_id} ({count} ends recorded)")
    for job_id in r["lost"][:10]:
        print(f"  lost: {job_id}")
    for job_id in missing_callbacks[:10]:
        print(f"  callback missing: {job_id}")

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": about,
            "command": " ".join(sys.argv), "jobs": args.jobs, "nodes": args.nodes,
            "engine": args.engine, "lease_s": args.lease if args.nodes > 1 else None,
            "faults_rate": args.faults, "seed": args.seed,
            "accepted": len(accepted), "deleted": len(r["deleted"]),
            "cancelled": len(r["cancelled"]),
            "finished": sum(finished.values()), "completed": finished["COMPLETED"],
            "failed": finished["FAILED"], "lost": len(r["lost"]), "stuck": len(r["stuck"]),
            "run_twice": len(twice), "reruns": reruns, "fenced_ends": fenced,
            "leases_reaped": lapsed, "deleted_yet_run": len(deleted_ran),
            "callbacks_missing": len(missing_callbacks), "callbacks_duplicated": repeated,
            "refused_400": dict(r["refused"]), "faults": dict(r["faults"]),
            "sent_elsewhere": dict(r["redirects"]), "per_node": r["nodes"],
            "unexpected": [repr(item) for item in unexpected],
            "tracebacks": tracebacks, "wall_s": round(wall, 1),
            "stats_answers": len(stats_ms), "stats_p50_ms": percentile[50],
            "stats_p99_ms": percentile[99], "stats_max_ms": stats_ms[-1] if stats_ms else None,
            "stats_while_starting_ms": [round(ms, 1) for ms in starting_ms],
            "foreign_cpu_s": round(foreign_s, 1), "foreign_cpu_share": round(foreign_share, 3),
        }, indent=2) + "\n")
        print(f"figures in {args.json}")
    failing = (r["lost"] or r["stuck"] or twice or finished["FAILED"] > len(r["cancelled"])
               or missing_callbacks or unexpected or tracebacks or deleted_ran)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
