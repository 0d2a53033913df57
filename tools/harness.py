"""The real things whisperd's tests and benchmarks run against, in one place.

A whisperd process on a loopback port with a small HTTP client, a webhook receiver (a
stdlib HTTP server), speech spoken by espeak-ng, recorded speech from Debian's packages,
the word error rate, and a wait on a condition. Standard library only: nothing here
imports torch or whisper.
"""

import array
import collections
import contextlib
import gzip
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHISPERD = ROOT / "whisperd.py"
PYTHON = sys.executable

# Every wait is on a condition; these ceilings only say when to give up. They are meant
# to hold on a machine three times slower than a quiet 2-core one.
CEILING = float(os.environ.get("WHISPERD_TEST_CEILING", 300))


# Under pytest-xdist (`make test` runs 3 workers), each worker's daemons decode on their
# share of the cores: both engines' thread pools (PyTorch's and CTranslate2's OpenMP) spin
# while they wait, and two daemons of 2 threads each on 2 cores spent most of their time
# waiting on each other (measured: a test of 24 s alone took 90 s beside another).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
SHARE_CORES = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // _WORKERS))} \
    if _WORKERS > 1 else {}


def wait_until(predicate, timeout=CEILING, message="the condition never held", poll=0.05):
    """Returns predicate()'s first true value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (waited {timeout:g} s)")
        time.sleep(poll)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Speech, and how close a transcript is to it
# ---------------------------------------------------------------------------------------

SPEECH_RATE = 140  # espeak-ng words a minute: tiny.en hears it word for word


def speak(text, wav, rate=SPEECH_RATE):
    """Speaks `text` into the WAV file `wav` with espeak-ng."""
    wav = Path(wav)
    wav.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-s", str(rate), "-w", str(wav), text], check=True)
    return wav


def convert(source, target, *more, before=()):
    """ffmpeg -i source [more inputs and options] target (the format follows target's
    extension); `before`: options for the first input (-f lavfi)."""
    inputs = [x for item in more if isinstance(item, Path) for x in ("-i", str(item))]
    options = [str(item) for item in more if not isinstance(item, Path)]
    subprocess.run(["ffmpeg", "-loglevel", "error", "-nostdin", "-y", *before, "-i",
                    str(source), *inputs, *options, str(target)], check=True)
    return Path(target)


def audio_seconds(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True)
    return float(out.stdout.strip())


SOUNDS = Path("/usr/share/asterisk/sounds")
VOICES = {"en": "en_US_f_Allison", "es": "es_MX_f_Allison", "fr": "fr_CA_f_June",
          "it": "it_IT_m_Carlo", "ru": "ru_RU_f_IvrvoiceRU"}


def prompt(language, name):
    """(path, script) of a recorded Asterisk voice prompt (Debian's
    asterisk-core-sounds-LANG-g722, scripts in asterisk-core-sounds-LANG)."""
    scripts = Path(f"/usr/share/doc/asterisk-core-sounds-{language}/"
                   f"core-sounds-{language}.txt.gz")
    with gzip.open(scripts, "rt", encoding="utf-8") as f:
        for line in f:
            key, _, text = line.partition(":")
            if key.strip() == name:
                return SOUNDS / VOICES[language] / f"{name}.g722", text.strip()
    raise KeyError(f"no prompt {name!r} in {scripts}")


LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def reading(name):
    """(path, script) of a LibriVox reading in Debian's pocketsphinx-testdata."""
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        found = re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip())
        if found and found.group(2) == name:
            return LIBRIVOX / f"{name}.wav", found.group(1)
    raise KeyError(f"no reading {name!r} in {LIBRIVOX}")


# -- conversations: turns of real recorded voices, who spoke when known -------------------

TALKERS = {"allison": SOUNDS / VOICES["en"], "carlo": SOUNDS / VOICES["it"],
           "june": SOUNDS / VOICES["fr"], "ivr": SOUNDS / VOICES["ru"], "librivox": LIBRIVOX}


def _pcm(path):
    """16 kHz mono s16le samples of a clip, its quiet start and end cut off."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "s16le",
                          "-ac", "1", "-ar", "16000", "-"], capture_output=True,
                         check=True).stdout
    samples = array.array("h", raw)
    loud = [i for i in range(0, len(samples), 80) if abs(samples[i]) > 300]
    return samples[loud[0]:loud[-1] + 1] if loud else samples


def _clips(voice, odd=False):
    """A voice's recordings, sorted: conversations take those at even places, references
    those at odd ones, so that no reference is heard in a conversation."""
    folder = TALKERS[voice]
    files = sorted(folder.glob("*.g722" if folder != LIBRIVOX else "*.wav"))
    return files[odd::2]


def _write_wav(path, channels):
    with wave.open(str(path), "wb") as out:
        out.setnchannels(len(channels))
        out.setsampwidth(2)
        out.setframerate(16000)
        frames = array.array("h", bytes(2 * len(channels) * len(channels[0])))
        for c, samples in enumerate(channels):
            frames[c::len(channels)] = samples
        out.writeframes(frames.tobytes())
    return Path(path)


def conversation(path, voices, turns, seed=0, channels=False):
    """Writes a WAV of `voices` (TALKERS) taking `turns` turns, each of one or two clips of
    1.5 to 7 s, 0.3 to 0.8 s apart; returns who spoke when. With
    `channels`, voice i is on channel i, and each turn begins 1 s before the one before it
    ends: they overlap. Each turn: (start, end, voice, its clip's path)."""
    rng = random.Random(seed)
    pools = {voice: _clips(voice) for voice in voices}
    tracks = [array.array("h") for _ in voices]
    said, last, now = [], None, 0
    for _ in range(turns):
        voice = rng.choice([v for v in voices if v != last])
        for n in range(rng.choice((1, 1, 2))):
            while not 1.5 * 16000 <= len(clip := _pcm(source := rng.choice(pools[voice]))) \
                    <= 7 * 16000:
                pass
            start = now + int(rng.uniform(0.3, 0.8) * 16000)
            if channels and last not in (None, voice) and n == 0:
                start = now - 16000  # one second over the one before
            track = tracks[voices.index(voice) if channels else 0]
            track.extend(array.array("h", bytes(2 * max(0, start - len(track)))))
            track.extend(clip)
            said.append((round(start / 16000, 3), round((start + len(clip)) / 16000, 3), voice,
                         source))
            now = start + len(clip)
        last = voice
    tracks = tracks if channels else tracks[:1]
    length = max(len(track) for track in tracks) + 8000
    for track in tracks:
        track.extend(array.array("h", bytes(2 * (length - len(track)))))
    _write_wav(path, tracks)
    return said


def reference(path, voice, seconds=4.0):
    """Writes a WAV of `voice` alone, about `seconds` long, from clips no conversation
    holds (a known speaker's reference)."""
    samples = array.array("h")
    for clip in _clips(voice, odd=True):
        if len(samples) >= seconds * 16000:
            break
        samples.extend(_pcm(clip))
        samples.extend(array.array("h", bytes(2 * 4000)))
    return _write_wav(path, [samples])


def who_spoke(said, start, end):
    """The voice heard most between start and end (or the nearest), by `said`."""
    return max(said, key=lambda t: (min(end, t[1]) - max(start, t[0]),
                                    -min(abs(start - t[1]), abs(end - t[0]))))[2]


def words_right(said, segments):
    """The share of the words (with their times) given their right speaker: each label
    stands for the voice it was most given to, each voice for one label at most."""
    pairs = [(who_spoke(said, w["start"], w["end"]), w["speaker"])
             for segment in segments for w in segment["words"]]
    counts = collections.Counter(pairs)
    voice_of, taken = {}, set()
    for (voice, label), _ in counts.most_common():
        if label not in voice_of and voice not in taken:
            voice_of[label] = voice
            taken.add(voice)
    return sum(voice_of.get(label) == voice for voice, label in pairs) / max(len(pairs), 1)


def words(text):
    """Lower case, accents and punctuation gone (hyphens split words): what the WER
    compares (the Asterisk scripts spell "numero" where Whisper writes "número")."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text.lower())
                   if not unicodedata.combining(c))
    return re.sub(r"[^\w' ]", " ", text.replace("-", " ")).split()


def edit_distance(reference, hypothesis):
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hypothesis, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def word_error_rate(*pairs):
    """Word error rate of (reference, hypothesis) pairs: all errors over all words."""
    errors = total = 0
    for reference, hypothesis in pairs:
        errors += edit_distance(words(reference), words(hypothesis))
        total += len(words(reference))
    return errors / max(total, 1)


# ---------------------------------------------------------------------------------------
# whisperd
# ---------------------------------------------------------------------------------------

class Daemon:
    """A whisperd.py process on a loopback port ("--port 0": its log says which), and a
    small HTTP client for it."""

    def __init__(self, state_dir, model_dir, *flags, env=None, token=None, model="tiny.en"):
        self.state_dir, self.model_dir = Path(state_dir), Path(model_dir)
        self.flags, self.env, self.token, self.model = list(flags), env or {}, token, model
        self.proc, self.lines = None, []

    def start(self):
        command = [PYTHON, str(WHISPERD), "--host", "127.0.0.1", "--port", "0",
                   "--state-dir", str(self.state_dir), "--model-dir", str(self.model_dir),
                   "--default-model", self.model, *self.flags]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL,
                                     env={**os.environ, **SHARE_CORES, **self.env})
        ceiling = threading.Timer(CEILING, self.proc.kill)  # one that never listens ends
        ceiling.start()
        try:
            for line in self.proc.stderr:
                self.lines.append(line)
                found = re.search(r"listening on http://([\d.]+):(\d+)", line)
                if found:
                    self.host, self.port = found.group(1), int(found.group(2))
                    break
            else:
                raise AssertionError(f"whisperd did not start (or listen within {CEILING:g} "
                                     f"s):\n" + self.log)
        finally:
            ceiling.cancel()
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()
        return self

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self):
        return "".join(self.lines)

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def request(self, method, path, body=None, headers=None, raw=None, timeout=CEILING):
        """Returns (status, headers, body as JSON where it is JSON, else text)."""
        headers = dict(headers or {})
        if self.token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body))
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return response.status, response.headers, json.loads(text)
        return response.status, response.headers, text

    @contextlib.contextmanager
    def stream(self, path, headers=None, timeout=CEILING):
        """GET `path` as Server-Sent Events: yields (status, an iterator of its events as
        they come: {"event", "data", "id"}, data as JSON where it is); the connection
        closes when the block ends."""
        headers = dict(headers or {}, Accept="text/event-stream")
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            yield response.status, server_sent_events(response)
        finally:
            connection.close()

    def submit(self, **fields):
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}
        status, _, job = self.request("POST", "/transcription/job", fields)
        assert status == 201, job
        return job

    def job(self, job_id):
        status, _, job = self.request("GET", f"/transcription/job/{job_id}")
        assert status == 200, job
        return job

    def stats(self):
        return self.request("GET", "/stats")[2]

    def finished(self, job_id, timeout=CEILING):
        """The job once COMPLETED or FAILED (long-polled with ?wait=)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _, job = self.request("GET", f"/transcription/job/{job_id}?wait=30")
            assert status == 200, job
            if job["status"] in ("COMPLETED", "FAILED"):
                return job
        raise AssertionError(f"job {job_id} did not finish within {timeout:g} s")

    def completed(self, job_id, timeout=CEILING):
        job = self.finished(job_id, timeout)
        assert job["status"] == "COMPLETED", job["error"]
        return job

    def running(self, job_id, timeout=CEILING):
        return wait_until(lambda: (job := self.job(job_id))["status"] == "RUNNING" and job,
                          timeout, f"job {job_id} never ran")

    def idle(self, timeout=CEILING):
        """Waits until no job is queued or running."""
        wait_until(lambda: (s := self.stats())["Queued"] == 0 and s["Running"] == 0,
                   timeout, "whisperd never went idle")

    def logged(self, pattern, timeout=CEILING):
        """Waits for a log line matching `pattern` (a regular expression)."""
        return wait_until(lambda: re.search(pattern, self.log), timeout,
                          f"whisperd never logged {pattern!r}")

    def kill(self):
        self.proc.kill()
        self.proc.wait(CEILING)
        self.drain.join(CEILING)  # every line it wrote is in .log

    def terminate(self, timeout=CEILING):
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout)
        self.drain.join(CEILING)
        return status

    def stop(self):
        """Stops it if it runs; fails if it ever printed a traceback, or answered a route
        with a status its declaration (and so /openapi.json) leaves out."""
        if self.proc and self.proc.poll() is None:
            self.terminate()
        if getattr(self, "drain", None):
            self.drain.join(CEILING)
        assert "Traceback" not in self.log, self.log
        assert "is not declared in /openapi.json" not in self.log, self.log


def server_sent_events(lines):
    """The events of a text/event-stream (a binary file of its lines), as an EventSource
    reads them: {"event", "data" (JSON where it is), "id"}; comments are skipped."""
    event = {}
    for raw in lines:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in event:
                with contextlib.suppress(ValueError):
                    event["data"] = json.loads(event["data"])
                yield {"event": "message", "id": None, **event}
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            event[name] = event[name] + "\n" + value if name == "data" and "data" in event \
                else value


class Receiver:
    """A real webhook receiver: answers with the given statuses in turn (then 200) and
    records every request it got as (headers, body, status answered)."""

    def __init__(self, answers=(), port=0):
        self.calls, self.answers = [], list(answers)
        self.arrived = threading.Condition()
        receiver = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.calls.append((dict(self.headers), body, status))
                    receiver.arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count, timeout=CEILING):
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.calls) >= count, timeout), \
                f"{len(self.calls)} callbacks arrived, expected {count}"
            return list(self.calls)

    def jobs(self):
        """The job JSON of each request so far."""
        with self.arrived:
            return [json.loads(body) for _, body, _ in self.calls]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------
# PostgreSQL: a throwaway cluster for the shared job store (--store postgresql://...)
# ---------------------------------------------------------------------------------------

def postgres_bindir():
    """The folder with PostgreSQL's server binaries (initdb, pg_ctl, postgres): $PG_BINDIR,
    else `pg_config --bindir` where it has them, else the newest /usr/lib/postgresql/*/bin,
    else wherever PATH finds initdb. None when there is no server."""
    import shutil

    def has_server(folder):
        return folder and all((Path(folder) / name).exists() for name in ("initdb", "pg_ctl", "postgres"))

    candidates = [os.environ.get("PG_BINDIR")]
    try:
        candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True,
                                         text=True, timeout=30, check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")],
                      reverse=True)
    candidates += [str(p) for p in versions]
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    return next((Path(c) for c in candidates if has_server(c)), None)


class Postgres:
    """A PostgreSQL cluster of its own in `folder` on a free loopback port, for tests:
    Postgres(folder).start() runs initdb (the first time), starts the server, waits until
    it answers, creates `database` and gives `.url` (postgresql://postgres@127.0.0.1:PORT/
    DATABASE, trust authentication). stop() (a fast shutdown, or mode="immediate" for a
    crash) and start() again keep the data and the port: a database outage and its end.
    close() stops it and removes everything it made.

    The server refuses to run as root: as root, the cluster belongs to the `postgres` user
    (Debian's package makes it) or else `nobody`, and the binaries run through runuser.
    Where that user cannot reach `folder` (pytest's tmp_path lies under a 0700
    /tmp/pytest-of-root) the cluster goes to a fresh folder under the system temporary
    folder instead, named by the symbolic link `folder`/cluster. It never touches the
    package's own `main` cluster."""

    def __init__(self, folder, database="whisperd", port=None, settings=None):
        self.folder, self.database = Path(folder), database
        self.port = port
        self.settings = {
            "listen_addresses": "'127.0.0.1'", "max_connections": "60",
            "shared_buffers": "16MB", "dynamic_shared_memory_type": "posix",
            "max_wal_size": "64MB", "min_wal_size": "32MB", "huge_pages": "off",
            "ssl": "off", "logging_collector": "off", "log_min_messages": "warning",
            "jit": "off", **(settings or {})}
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise FileNotFoundError("no PostgreSQL server (initdb, pg_ctl, postgres) found")
        self.home = None        # where the cluster lives: data/, run/ (socket), server.log
        self.user = None        # who runs the server (None: ourselves)
        self.created = False    # database made
        self.private_home = False

    # -- where, and as whom ------------------------------------------------------------

    def _as_user(self, command):
        if self.user is None:
            return command
        import shutil
        if shutil.which("runuser"):
            return ["runuser", "-u", self.user, "--", *command]
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.pw.pw_gid}",
                "--init-groups", "--", *command]

    def _run(self, *command, check=True, timeout=CEILING):
        binary = str(self.bindir / command[0])
        result = subprocess.run(self._as_user([binary, *map(str, command[1:])]),
                                cwd=self.home, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=timeout,
                                env={**os.environ, "LC_ALL": "C", "LANG": "C"}, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}{self.log_tail()}")
        return result

    def _reachable(self, folder):
        """Whether the server user may enter and write `folder`."""
        if self.user is None:
            return os.access(folder, os.W_OK | os.X_OK)
        return subprocess.run(self._as_user(["test", "-w", str(folder), "-a", "-x", str(folder)]),
                              cwd="/", stdin=subprocess.DEVNULL, check=False).returncode == 0

    def _prepare(self):
        import pwd
        import tempfile
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.pw = pwd.getpwnam(name)
                    self.user = name
                    break
                except KeyError:
                    continue
            else:
                raise RuntimeError("no unprivileged user (postgres, nobody) to run the server")
        home = self.folder
        if self.user is not None:
            os.chown(home, self.pw.pw_uid, self.pw.pw_gid)
        if not self._reachable(home):
            home = Path(tempfile.mkdtemp(prefix="whisperd-pg-"))
            self.private_home = True
            if self.user is not None:
                os.chown(home, self.pw.pw_uid, self.pw.pw_gid)
            link = self.folder / "cluster"
            if not link.exists():
                link.symlink_to(home)
        self.home = home
        (home / "run").mkdir(exist_ok=True)
        if self.user is not None:
            os.chown(home / "run", self.pw.pw_uid, self.pw.pw_gid)

    @property
    def data(self):
        return self.home / "data"

    @property
    def logfile(self):
        return self.home / "server.log"

    def log_tail(self, lines=30):
        try:
            return "\n--- server.log ---\n" + "\n".join(
                self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- life ----------------------------------------------------------------------------

    def _initdb(self):
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")
        socket_dir = self.home / "run"
        # A Unix socket path may hold 107 bytes: with a longer folder, TCP only.
        sockets = f"'{socket_dir}'" if len(str(socket_dir)) + 20 < 107 else "''"
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tools/harness.py Postgres\n")
            conf.writelines(f"{key} = {value}\n" for key, value in
                            {**self.settings, "unix_socket_directories": sockets}.items())

    def _pg_ctl_start(self):
        # -w waits until postmaster.pid says "ready" (PostgreSQL >= 10), with a ceiling.
        return self._run("pg_ctl", "start", "-D", self.data, "-l", self.logfile, "-w",
                         "-t", int(CEILING), "-o", f"-p {self.port}", check=False)

    def start(self):
        """Starts the server (initdb on the first call; a later call restarts it on the same
        data and port) and returns self once it accepts connections."""
        if self.home is None:
            self._prepare()
            import atexit
            atexit.register(self.close)   # a test that forgot close() leaves no server
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        fixed_port = self.port is not None
        for attempt in range(5):
            if self.port is None:
                self.port = free_port()
            result = self._pg_ctl_start()
            if result.returncode == 0:
                break
            busy = "already in use" in self.log_tail(10) or "could not bind" in self.log_tail(10)
            if fixed_port or not busy or attempt == 4:
                raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}{result.stderr}"
                                   f"{self.log_tail()}")
            self.port = None    # lost the race for that port: another one
        wait_until(self.accepting, message="PostgreSQL never accepted connections")
        if not self.created:
            exists = self._run("psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres",
                               "-d", "postgres", "-Atc",
                               f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'")
            if exists.stdout.strip() != "1":
                self._run("createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres",
                          self.database)
            self.created = True
        return self

    def accepting(self):
        """Whether the server accepts connections now (pg_isready)."""
        return self._run("pg_isready", "-q", "-h", "127.0.0.1", "-p", self.port,
                         "-U", "postgres", "-d", "postgres", "-t", "5",
                         check=False).returncode == 0

    def running(self):
        """Whether the server process runs (pg_ctl status)."""
        return self.home is not None and self._run(
            "pg_ctl", "status", "-D", self.data, check=False).returncode == 0

    def stop(self, mode="fast"):
        """Stops the server and waits until it is down: mode "fast" (roll back the open
        transactions, end the sessions, checkpoint) or "immediate" (a crash: recovery on
        the next start). Nothing happens when it does not run."""
        if self.running():
            self._run("pg_ctl", "stop", "-D", self.data, "-m", mode, "-w", "-t", int(CEILING))
        return self

    def close(self):
        """Stops the server and removes its files (and the folder's link to them)."""
        import shutil
        if self.home is None:
            return
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
            if self.private_home:
                link = self.folder / "cluster"
                if link.is_symlink():
                    link.unlink()
            self.home = None

    @property
    def url(self):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def psql(self, sql, database=None):
        """Runs SQL with psql; returns its unaligned, tuples-only output."""
        return self._run("psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres",
                         "-d", database or self.database, "-v", "ON_ERROR_STOP=1",
                         "-Atc", sql).stdout

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------
# A small disk: a tmpfs of a given size, to fill up or make read-only
# ---------------------------------------------------------------------------------------

import errno
import unittest


class SkipDisk(unittest.SkipTest):
    """No small disk here (not root, or no right to mount: a container without
    CAP_SYS_ADMIN). A unittest.SkipTest, so pytest reports a test that lets it through as
    skipped; a test may also catch it."""


def _mount(*args):
    try:
        result = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    return result.returncode == 0, (result.stderr or result.stdout).strip()


@contextlib.contextmanager
def small_disk(size_bytes):
    """Mounts a tmpfs of `size_bytes` (rounded up to whole pages) on a fresh temporary
    folder and yields its Path; unmounts it (lazily if it is busy) and removes the folder
    after. Raises SkipDisk where it cannot mount."""
    import shutil
    import tempfile
    if os.geteuid() != 0:
        raise SkipDisk("small_disk needs root to mount a tmpfs")
    where = Path(tempfile.mkdtemp(prefix="whisperd-disk-"))
    ok, why = _mount("-t", "tmpfs", "-o", f"size={int(size_bytes)},mode=0755", "tmpfs", where)
    if not ok:
        where.rmdir()
        raise SkipDisk(f"cannot mount a tmpfs: {why}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
        shutil.rmtree(where, ignore_errors=True)


def read_only(where, on=True):
    """Remounts the disk at `where` read-only (on=True) or read-write again. The kernel
    refuses (EBUSY, raised here as RuntimeError) while a file on it is open for writing."""
    ok, why = _mount("-o", "remount," + ("ro" if on else "rw"), where)
    if not ok:
        raise RuntimeError(f"cannot remount {where} {'ro' if on else 'rw'}: {why}")
    return Path(where)


@contextlib.contextmanager
def read_only_while(where):
    """The disk at `where` read-only inside the with block, writable again after."""
    read_only(where, True)
    try:
        yield Path(where)
    finally:
        read_only(where, False)


def fill(where, name="filler"):
    """Writes `where`/name until the disk is full (ENOSPC, down to the last byte) and
    returns its Path: delete it to free the space."""
    path = Path(where) / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return path
