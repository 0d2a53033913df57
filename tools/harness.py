"""The real things whisperd's tests and benchmarks run against, in one place.

A whisperd process on a loopback port with a small HTTP client, a webhook receiver (a
stdlib HTTP server), speech spoken by espeak-ng, recorded speech from Debian's packages,
the word error rate, and a wait on a condition. Standard library only: nothing here
imports torch or whisper.
"""

import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHISPERD = ROOT / "whisperd.py"
PYTHON = sys.executable

# Every wait is on a condition; these ceilings only say when to give up. They are meant
# to hold on a machine three times slower than a quiet 2-core one.
CEILING = float(os.environ.get("WHISPERD_TEST_CEILING", 300))


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

    def __init__(self, state_dir, model_dir, *flags, env=None, token=None):
        self.state_dir, self.model_dir = Path(state_dir), Path(model_dir)
        self.flags, self.env, self.token = list(flags), env or {}, token
        self.proc, self.lines = None, []

    def start(self):
        command = [PYTHON, str(WHISPERD), "--host", "127.0.0.1", "--port", "0",
                   "--state-dir", str(self.state_dir), "--model-dir", str(self.model_dir),
                   "--default-model", "tiny.en", *self.flags]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                break
        else:
            raise AssertionError("whisperd did not start:\n" + self.log)
        threading.Thread(target=self._drain, daemon=True).start()
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

    def terminate(self, timeout=CEILING):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self):
        """Stops it if it runs; fails if it ever printed a traceback."""
        if self.proc and self.proc.poll() is None:
            self.terminate()
        assert "Traceback" not in self.log, self.log


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
