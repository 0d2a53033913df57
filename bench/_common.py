"""Shared pieces of whisperd's benchmarks (bench/transcribe.py, bench/api.py).

Spoken test audio (espeak-ng, cached), word error rate, a whisperd process on a loopback
port with a small keep-alive HTTP client, peak memory of a process, and a machine summary.
Standard library only; nothing here imports torch or whisper.
"""

import hashlib
import http.client
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"                      # git-ignored: audio cache, models, scratch
PYTHON = sys.executable
WHISPERD = ROOT / "whisperd.py"

# Plain English, no digits, no contractions, no names: sentences tiny.en can hear word for
# word from espeak-ng, so the word error rate measures the engine, not the spelling rules.
SENTENCES = [
    "Thank you for calling. Your order has been sent and will arrive on Friday.",
    "Please call me back tomorrow morning.",
    "Remember to water the plants and feed the cat before you leave the house.",
    "Our team finished the report and sent it to every customer.",
    "The train to the city leaves early in the morning and returns late at night.",
    "She opened the window to let the fresh air into the small kitchen.",
    "We need more paper for the printer in the main office.",
    "The children played in the park until the sun went down.",
    "He forgot his umbrella and walked home in the heavy rain.",
    "Please close the door quietly when you leave the meeting.",
    "The new library is open every day except on public holidays.",
    "My brother likes to cook soup with fresh vegetables from the garden.",
    "The doctor told him to drink more water and to sleep longer.",
    "Our flight was delayed because of strong winds over the mountains.",
    "The teacher asked the students to read the first chapter at home.",
    "We will paint the fence white when the weather gets warmer.",
    "The bakery on the corner sells warm bread and sweet cakes.",
    "Please send me the invoice as soon as the work is done.",
    "The river runs through the old town and under the stone bridge.",
    "They bought a blue car with large windows and soft seats.",
    "The manager wants to move the meeting to next week.",
    "A small dog was sleeping in the shade of the tall tree.",
    "The museum shows paintings from many countries around the world.",
    "I would like a cup of coffee with milk and no sugar.",
    "The farmer sold apples and pears at the market on the square.",
    "Turn left at the church and walk straight to the end of the road.",
    "The students cleaned the classroom before the holidays began.",
    "Our neighbors planted roses along the path to their front door.",
    "The storm knocked down several trees near the school.",
    "Please check the spelling of every word before you print the letter.",
    "The hotel room had a view of the sea and the harbor.",
    "My sister is learning to play the piano in the evenings.",
    "The shop will close early today because of the festival.",
    "We watched the birds fly south as the autumn began.",
    "The engineer explained how the new machine saves energy.",
    "Please keep your ticket until the end of the journey.",
    "The soup was too hot, so we waited a few minutes.",
    "Everyone agreed that the plan was simple and clear.",
    "The old clock in the hall stopped working last winter.",
    "He carried the heavy boxes up the stairs to the attic.",
    "The company hired more workers to finish the bridge on time.",
    "We found a quiet table in the corner of the restaurant.",
    "The nurse measured his temperature and wrote it on the chart.",
    "The wind was cold, but the sky was bright and clear.",
    "Please turn off the lights when you leave the room.",
    "The mayor opened the new hospital with a short speech.",
    "They spent the weekend walking along the coast.",
    "The cook added salt and pepper to the sauce.",
    "Our teacher reads a story to the class every afternoon.",
    "The bus was full, so we decided to walk to the station.",
]

SPEECH_RATE = 140  # espeak-ng words a minute, as in the tests
CACHE_VERSION = 2  # bump when the way files are made changes


def text_of_seconds(seconds, seed):
    """Sentences (in a seeded random order, repeating as needed) that espeak-ng speaks
    in about `seconds` (it says about 2.7 words a second at -s 140)."""
    rng = random.Random(seed)
    order, words, chosen = [], 0, []
    while words < seconds * 2.7:
        if not order:
            order = SENTENCES[:]
            rng.shuffle(order)
        sentence = order.pop()
        chosen.append(sentence)
        words += len(sentence.split())
    return " ".join(chosen)


def speak(text, wav):
    """Speaks `text` into the WAV file `wav` (cached: kept if the text is unchanged)."""
    wav = Path(wav)
    ref = wav.with_suffix(".ref.txt")
    if wav.exists() and ref.exists() and ref.read_text() == text:
        return wav
    wav.parent.mkdir(parents=True, exist_ok=True)
    temp = wav.with_name(f".{wav.name}.tmp.wav")
    subprocess.run(["espeak-ng", "-s", str(SPEECH_RATE), "-w", str(temp), text], check=True)
    os.replace(temp, wav)
    ref.write_text(text)
    return wav


def audio_seconds(wav):
    with wave.open(str(wav)) as w:
        return w.getnframes() / w.getframerate()


def reference(wav):
    return Path(wav).with_suffix(".ref.txt").read_text()


def make_set(folder, seconds, prefix):
    """One spoken file per entry of `seconds`, as close to it as whole sentences allow
    (sentences are dropped from the end while the file is too long, and the closer of
    the last two tries is kept); returns their paths. Cached in `folder`."""
    files = []
    for i, s in enumerate(seconds):
        text = text_of_seconds(s, seed=f"{prefix}-{i}-{s}")
        digest = hashlib.sha1(f"{CACHE_VERSION}\n{text}".encode()).hexdigest()[:8]
        wav = Path(folder) / f"{prefix}{i:02d}-{s}s-{digest}.wav"
        if not (wav.exists() and wav.with_suffix(".ref.txt").exists()):
            sentences = [x.strip() for x in re.findall(r"[^.?!]+[.?!]", text)]
            best = None  # (distance from the target, number of sentences)
            for n in range(len(sentences), 0, -1):
                speak(" ".join(sentences[:n]), wav)
                took = audio_seconds(wav)
                if best is None or abs(took - s) < best[0]:
                    best = (abs(took - s), n)
                if took <= s:
                    break
            speak(" ".join(sentences[:best[1]]), wav)
        files.append(wav)
    return files


# ---------------------------------------------------------------------------------------
# Word error rate
# ---------------------------------------------------------------------------------------

def words(text):
    """Lower case, punctuation gone (hyphens split words): what WER compares."""
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def edit_distance(ref, hyp):
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def wer(pairs):
    """Corpus word error rate of [(reference, hypothesis), ...]: all errors / all words."""
    errors = total = 0
    for ref, hyp in pairs:
        r, h = words(ref), words(hyp)
        errors += edit_distance(r, h)
        total += len(r)
    return errors / max(total, 1)


# ---------------------------------------------------------------------------------------
# Processes and the machine
# ---------------------------------------------------------------------------------------

def nvidia_smi(*args):
    """What `nvidia-smi ARGS` prints, stripped; "" without one."""
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_mib(pid):
    """GPU memory a live process holds now (nvidia-smi), in MiB; None without a GPU."""
    out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    for line in out.splitlines():
        fields = [x.strip() for x in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1])
    return None


def peak_rss_mib(pid):
    """VmHWM (peak resident set) of a live process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _busy_cores(seconds=3.0):
    """Cores' worth of CPU the whole machine used over `seconds` (from /proc/stat)."""
    def busy():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields[:8]) - fields[3] - fields[4]
    before = busy()
    time.sleep(seconds)
    return (busy() - before) / os.sysconf("SC_CLK_TCK") / seconds


def wait_until_quiet(pattern=r"pytest|\.ci/run", poll=30.0, busy_limit=0.25,
                     give_up=1800.0):
    """Waits while other heavy work shares the CPU: a test suite (processes matching
    `pattern`) or anything keeping more than `busy_limit` of a core busy. Gives up (and
    says so) after `give_up` seconds. Returns seconds waited."""
    started = time.monotonic()
    me = {os.getpid(), os.getppid()}
    while time.monotonic() - started < give_up:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        pids = {int(p) for p in found.stdout.split()} - me
        load = 0.0 if pids else _busy_cores()
        if not pids and load <= busy_limit:
            return time.monotonic() - started
        why = (f"{len(pids)} process(es) match {pattern!r}" if pids
               else f"the machine is {load:.0%} of a core busy")
        print(f"  waiting for a quiet machine: {why} ...", file=sys.stderr, flush=True)
        time.sleep(poll)
    print("  the machine did not get quiet; measuring anyway", file=sys.stderr, flush=True)
    return time.monotonic() - started


class CpuWatch:
    """How much CPU other processes took while we measured: the machine's busy time
    (/proc/stat) less what this process and its reaped children used. Call it only once
    every child has been waited for."""

    def __init__(self):
        self.busy, self.ours = self._busy(), self._ours()
        self.started = time.monotonic()

    @staticmethod
    def _busy():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def foreign(self):
        """(CPU seconds others used, as a share of one core over the run)."""
        others = max(0.0, (self._busy() - self.busy) - (self._ours() - self.ours))
        return others, others / max(time.monotonic() - self.started, 1e-9)

    def verdict(self):
        others, share = self.foreign()
        text = (f"other processes used {others:.0f} CPU-seconds during the run "
                f"({share:.0%} of one core on average)")
        if share > 0.10:
            text += ": the machine was shared, so these figures are suspect; run again"
        return text, others, share


def machine():
    """A few lines about the machine and the versions that matter."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) / 1024 / 1024
    versions = subprocess.run(
        [str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else PYTHON,
         "-c", "import importlib.metadata as m\n"
               "for p in ('torch','openai-whisper','faster-whisper','ctranslate2'):\n"
               "    try: print(p, m.version(p))\n"
               "    except Exception: print(p, '-')"],
        capture_output=True, text=True).stdout.split("\n")
    gpu = nvidia_smi("--query-gpu=name,driver_version,memory.total",
                     "--format=csv,noheader") or None
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_gib": round(ram, 1), "gpu": gpu,
            "python": platform.python_version(), "kernel": platform.release(),
            **dict(line.split(" ", 1) for line in versions if line)}


# ---------------------------------------------------------------------------------------
# whisperd
# ---------------------------------------------------------------------------------------

class Daemon:
    """whisperd.py on a loopback port ("--port 0", the log tells which)."""

    def __init__(self, state_dir, model_dir, flags=()):
        self.state_dir, self.model_dir, self.flags = Path(state_dir), model_dir, list(flags)
        self.lines = []

    def start(self):
        self.started = time.monotonic()
        command = [PYTHON, str(WHISPERD), "--host", "127.0.0.1", "--port", "0",
                   "--state-dir", str(self.state_dir), "--model-dir", str(self.model_dir),
                   "--default-model", "tiny.en", *self.flags]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                break
        else:
            raise RuntimeError("whisperd did not start:\n" + "".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()
        self.http = Client(self.host, self.port)
        return self

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def pid(self):
        return self.proc.pid

    def submit(self, path, output_path, **fields):
        status, job = self.http.request("POST", "/transcription/job", {
            "path": str(path), "output_path": str(output_path), "format": "txt", **fields})
        if status != 201:
            raise RuntimeError(f"POST answered {status}: {job}")
        return job

    def finished(self, job_id, timeout=3600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.http.request("GET", f"/transcription/job/{job_id}?wait=60")
            if status != 200:
                raise RuntimeError(f"GET answered {status}: {job}")
            if job["status"] in ("COMPLETED", "FAILED"):
                if job["status"] == "FAILED":
                    raise RuntimeError(f"job failed: {job['error']}")
                return job
        raise RuntimeError(f"job {job_id} did not finish in {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if "Traceback" in "".join(self.lines):
            print("".join(self.lines), file=sys.stderr)


class Client:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closed it."""

    def __init__(self, host, port, timeout=120):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = None

    def request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port,
                                                       timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data)
                response = self.conn.getresponse()
                text = response.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        if response.headers.get("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
        kind = response.headers.get("Content-Type", "")
        return response.status, (json.loads(text) if kind.startswith("application/json")
                                 else text.decode())
