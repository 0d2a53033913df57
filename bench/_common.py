"""What whisperd's benchmarks (bench/*.py) share beyond tools/harness.py.

tools/harness.py, which the tests use too, has the daemon, the webhook receiver, speech,
audio length and the word error rate; this adds what only a benchmark needs: a spoken set
of files of given lengths (cached, its text the reference), the models, a quiet machine
and what else used the CPU, peak memory, GPU memory and a machine summary.
Standard library only; nothing here imports torch or whisper.
"""

import hashlib
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# Bench scripts run as `python bench/x.py`, which puts bench/ first on the path, where
# queue.py would stand for the standard library's queue (torch and concurrent.futures
# import it): once this module is in, bench/ leaves the path and the repository's root
# takes its place.
sys.path[:] = [str(BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]
from tools.harness import (PYTHON, ROOT, WHISPERD, Daemon, Receiver,  # noqa: E402,F401
                           audio_seconds, free_port, speak, wait_until, word_error_rate)

OUT = BENCH / "out"                      # git-ignored: audio cache, models, scratch
MODEL_DIR = os.environ.get("WHISPERD_MODEL_DIR") or str(OUT / "models")

# The `whisper` command line's decoding defaults (whisper/transcribe.py, cli()), which
# whisperd decodes with too: the bare loops of every bench use them.
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
CLI_DECODING = {"beam_size": 5, "best_of": 5, "temperature": TEMPERATURES,
                "compression_ratio_threshold": 2.4, "no_speech_threshold": 0.6,
                "condition_on_previous_text": True}
LOGPROB_THRESHOLD = -1.0
JOB_TIMEOUT = 3600  # seconds a job may take before the bench gives up on it


def ensure_models(model_dir, *names):
    """Installs the models `names` (default tiny.en) offline into `model_dir` with
    tools/models.py (a no-op when they are there); returns the folder's absolute path."""
    model_dir = os.path.abspath(model_dir)
    subprocess.run([PYTHON, str(ROOT / "tools" / "models.py"), model_dir,
                    *(names or ["tiny.en"])], check=True)
    return model_dir


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

CACHE_VERSION = 2  # bump when the way files are made changes


def text_of_seconds(seconds, seed):
    """Sentences (in a seeded random order, repeating as needed) that espeak-ng speaks
    in about `seconds` (it says about 2.7 words a second at -s 140)."""
    rng = random.Random(seed)
    order, count, chosen = [], 0, []
    while count < seconds * 2.7:
        if not order:
            order = SENTENCES[:]
            rng.shuffle(order)
        sentence = order.pop()
        chosen.append(sentence)
        count += len(sentence.split())
    return " ".join(chosen)


def reference(wav):
    """The text `wav` was spoken from (make_set keeps it beside the file)."""
    return Path(wav).with_suffix(".ref.txt").read_text()


def make_set(folder, seconds, prefix):
    """One spoken file per entry of `seconds`, as close to it as whole sentences allow
    (sentences are dropped from the end while the file is too long, and the closer of
    the last two tries is kept); returns their paths. Cached in `folder`: a file is kept
    while its .ref.txt (the text, written last) is there."""
    files = []
    for i, s in enumerate(seconds):
        text = text_of_seconds(s, seed=f"{prefix}-{i}-{s}")
        digest = hashlib.sha1(f"{CACHE_VERSION}\n{text}".encode()).hexdigest()[:8]
        wav = Path(folder) / f"{prefix}{i:02d}-{s}s-{digest}.wav"
        ref = wav.with_suffix(".ref.txt")
        if not (wav.exists() and ref.exists()):
            ref.unlink(missing_ok=True)
            sentences = [x.strip() for x in re.findall(r"[^.?!]+[.?!]", text)]
            temp = wav.with_name(f".{wav.name}.tmp.wav")
            best = None  # (distance from the target, number of sentences)
            for n in range(len(sentences), 0, -1):
                took = audio_seconds(speak(" ".join(sentences[:n]), temp))
                if best is None or abs(took - s) < best[0]:
                    best = (abs(took - s), n)
                if took <= s:
                    break
            spoken = " ".join(sentences[:best[1]])
            if best[1] != n:  # the try before the last was closer
                speak(spoken, temp)
            os.replace(temp, wav)
            ref.write_text(spoken)
        files.append(wav)
    return files


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


def print_machine():
    """Prints what the figures were measured on; returns machine()."""
    m = machine()
    print(f"machine: {m['cpus']} CPUs ({m['cpu']}), {m['ram_gib']} GiB, GPU {m['gpu'] or '-'}; "
          f"torch {m['torch']}, openai-whisper {m['openai-whisper']}, faster-whisper "
          f"{m['faster-whisper']}, ctranslate2 {m['ctranslate2']}", flush=True)
    return m
