#!/usr/bin/env python3
"""whisperd: OpenAI's Whisper behind a small HTTP job API.

A shell script POSTs a job naming an audio file on this host; one worker thread per
device transcribes jobs in the order they came; the transcript lands as files in a
folder (written by openai-whisper's own writers) and a webhook is called when the job
ends. Jobs live in a SQLite database, so a job that was accepted is never lost: not to a
crash, a `kill -9`, a reboot or a `systemctl restart`.

The HTTP API is the one of the original "Whisper Api" (ORIGINAL-API.md) with the gaps
settled by CONTRACT.md; README.md documents every endpoint and flag.

Dependencies: the Python standard library for the server, the queue, the job store and
the callbacks; openai-whisper (and torch) in the worker thread; faster-whisper only with
`--engine faster-whisper`. Heavy imports happen in the worker, after the port answers.

Sections, in reading order: settings, jobs and validation, job store, engines, worker,
callbacks, service, HTTP, systemd, main.
"""

import argparse
import collections
import contextlib
import email.parser
import email.policy
import errno
import fcntl
import gc
import hashlib
import hmac
import heapq
import http.client
import io
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

# The valid values of ORIGINAL-API.md, word for word: they are the wire format.
LANGUAGES = (
    "af,am,ar,as,az,ba,be,bg,bn,bo,br,bs,ca,cs,cy,da,de,el,en,es,et,eu,fa,fi,fo,fr,gl,gu,"
    "ha,haw,he,hi,hr,ht,hu,hy,id,is,it,ja,jw,ka,kk,km,kn,ko,la,lb,ln,lo,lt,lv,mg,mi,mk,ml,"
    "mn,mr,ms,mt,my,ne,nl,nn,no,oc,pa,pl,ps,pt,ro,ru,sa,sd,si,sk,sl,sn,so,sq,sr,su,sv,sw,"
    "ta,te,tg,th,tk,tl,tr,tt,uk,ur,uz,vi,yi,yo,zh"
).split(",")
AUTO_LANGUAGE = "auto"
FORMATS = ("txt", "vtt", "srt", "tsv", "json", "all")
WRITTEN_FORMATS = ("txt", "vtt", "srt", "tsv", "json")  # what "all" writes
MODELS = ("tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
          "large-v1", "large-v2", "large")
TASKS = ("transcribe", "translate")
ENGINES = ("openai-whisper", "faster-whisper")

MAX_BODY = 1 << 20          # bytes of a request body
MAX_WAIT = 60.0             # seconds a GET ?wait= may hold a request
CONNECTION_TIMEOUT = 30.0   # seconds a client may sit idle on its connection
SMI_TIMEOUT = 10.0          # seconds nvidia-smi may take


def _default_model_dir():
    # Where the `whisper` command keeps its models, so both share one download.
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "whisper")


def _default_state_dir():
    # systemd's StateDirectory= hands us $STATE_DIRECTORY (colon separated if several).
    return (os.environ.get("STATE_DIRECTORY") or "").split(":")[0] or "./var"


def build_parser():
    """The daemon's flags. Every flag --foo-bar may also be set as WHISPERD_FOO_BAR."""
    parser = argparse.ArgumentParser(
        prog="whisperd", description="Whisper speech-to-text behind a small HTTP job API.",
        epilog="Every flag may also be given as an environment variable WHISPERD_<FLAG>, "
               "for example WHISPERD_PORT=9000 or WHISPERD_ALLOW_DIR=/srv/a:/srv/b. "
               "As a client of a running whisperd: whisperd submit|status|jobs --help.")

    def flag(name, default, type=str, help="", **kwargs):
        env = "WHISPERD_" + name.upper().replace("-", "_")
        value = os.environ.get(env)
        if kwargs.get("action") == "append":
            default = [d for d in value.split(os.pathsep) if d] if value else default
        elif value is not None:
            default = value  # argparse converts string defaults with `type`
        parser.add_argument("--" + name, default=default, help=f"{help} [{env}]",
                            **({} if "action" in kwargs else {"type": type}), **kwargs)

    flag("host", "127.0.0.1", help="address to listen on (default: loopback only)")
    flag("port", 9000, int, "port to listen on; 0 picks a free one")
    flag("model-dir", _default_model_dir(), help="folder of models: NAME.pt (openai-whisper) "
         "or NAME/ (faster-whisper); missing models are downloaded into it")
    flag("default-model", "large-v2", help="model for jobs that name none")
    flag("device", "auto", help="auto, cpu, cuda or cuda:N (auto: cuda when a GPU is seen)")
    flag("engine", "openai-whisper", help="openai-whisper or faster-whisper")
    flag("compute-type", "auto", help="faster-whisper: int8, float16, float32... "
         "(auto: float16 on GPU, int8 on CPU)")
    flag("batch-size", 0, int, "faster-whisper: >0 uses its batched pipeline (with VAD)")
    flag("max-models", 1, int, "models kept loaded; the least recently used goes first")
    flag("model-ttl", 0, float, "seconds a model may sit unused before it is unloaded "
         "(0: never)")
    flag("state-dir", _default_state_dir(), help="folder of the job database")
    flag("history", 10, int, "finished jobs kept")
    flag("max-attempts", 3, int, "times a job is started before a job that keeps "
         "interrupting the daemon is FAILED")
    flag("max-queue", 1000, int, "queued jobs accepted; past it POST answers 503")
    flag("shutdown-grace", 30, float, "seconds SIGTERM waits for the running job")
    flag("max-upload", 25, float, "MiB an upload to /v1/audio/* may have")
    flag("token", None, help="require 'Authorization: Bearer TOKEN' on every request")
    flag("allow-dir", [], action="append", metavar="DIR",
         help="(repeatable) path and output_path must lie inside one of these folders")
    flag("callback-secret", None, help="sign callbacks: X-Whisperd-Signature: "
         "sha256=<HMAC of the body>")
    flag("callback-attempts", 6, int, "deliveries tried per callback")
    flag("callback-backoff", 4, float, "seconds before the first retry; doubles each time")
    flag("callback-timeout", 10, float, "seconds one delivery may take")
    parser.add_argument("--version", action="version", version=f"whisperd {__version__}")
    return parser


def parse_settings(argv=None):
    parser = build_parser()
    settings = parser.parse_args(argv)
    if settings.engine not in ENGINES:
        parser.error(f"--engine must be one of {', '.join(ENGINES)}")
    if settings.default_model not in MODELS:
        parser.error(f"--default-model must be one of {', '.join(MODELS)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", settings.device):
        parser.error("--device must be auto, cpu, cuda or cuda:N")
    for name in ("history", "max_queue", "batch_size", "model_ttl"):
        if getattr(settings, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    for name in ("max_attempts", "max_models", "callback_attempts"):
        if getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    settings.model_dir = os.path.abspath(os.path.expanduser(settings.model_dir))
    settings.state_dir = os.path.abspath(os.path.expanduser(settings.state_dir))
    settings.allow_dir = [os.path.realpath(d) for d in settings.allow_dir]
    return settings


def log(message):
    """One line per event on stderr; journald adds the timestamp."""
    print(f"whisperd: {message}", file=sys.stderr, flush=True)


def utcnow():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------
# Jobs and validation
# ---------------------------------------------------------------------------------------

QUEUED, RUNNING, COMPLETED, FAILED = "QUEUED", "RUNNING", "COMPLETED", "FAILED"
FINISHED = (COMPLETED, FAILED)


class HTTPError(Exception):
    """An answer other than success; raised anywhere, turned into JSON at the edge."""

    def __init__(self, status, message, field=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.field = HTTPStatus(status), message, field
        self.headers = headers or {}


class Job:
    """One transcription job. Its attributes, in this order, are its JSON."""

    # The original API's keys first, in its order; everything after them was added.
    def __init__(self, id, path, language, format, output_path, callback, model,
                 task="transcribe", initial_prompt="", word_timestamps=False,
                 max_line_width=None, max_line_count=None, highlight_words=False,
                 temperature=0.0):
        self.id = id
        self.path = path
        self.language = language
        self.format = format
        self.output_path = output_path
        self.progress = 0
        self.status = QUEUED
        self.result = ""
        self.callback = callback
        self.model = model
        self.Duration = 0
        self.error = ""
        self.created_at = utcnow()
        self.started_at = None
        self.finished_at = None
        self.attempts = 0
        self.audio_duration = None
        self.callback_status = ""       # pending, delivered or failed once there is one
        self.callback_attempts = 0
        self.task = task
        self.initial_prompt = initial_prompt
        self.word_timestamps = word_timestamps
        self.max_line_width = max_line_width
        self.max_line_count = max_line_count
        self.highlight_words = highlight_words
        self.temperature = temperature

    def to_json(self):
        return dict(vars(self))

    @classmethod
    def from_json(cls, doc):
        # Keys a newer or older whisperd wrote are dropped or defaulted, not fatal.
        job = cls(**{k: doc[k] for k in ("id",) + JOB_FIELDS if k in doc})
        vars(job).update((k, v) for k, v in doc.items() if k in vars(job))
        return job

    @property
    def writer_options(self):
        """The options openai-whisper's subtitle writers take, as the CLI passes them."""
        return {"max_line_width": self.max_line_width, "max_line_count": self.max_line_count,
                "highlight_words": self.highlight_words}


# The keys a client may send, and what each must be.
JOB_FIELDS = ("path", "language", "format", "output_path", "callback", "model", "task",
              "initial_prompt", "word_timestamps", "max_line_width", "max_line_count",
              "highlight_words", "temperature")


def _string(body, field):
    value = body.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise HTTPError(400, f"{field} must be a string", field)
    return value


def _one_of(body, field, valid, default):
    value = _string(body, field) or default
    if value not in valid:
        raise HTTPError(400, f"{field} {value!r} is not supported; valid values: "
                             f"{', '.join(valid)}", field)
    return value


def _inside(path, roots):
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, root]) == root for root in roots)


def validate(body, settings):
    """Checks a submitted job body; returns the Job, or raises HTTPError naming the field.

    Everything a job needs is checked here, at submit time, so that a job that got its
    201 fails later only for reasons nobody could see coming (audio that does not decode,
    a model that cannot be had).
    """
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object, like "
                             '{"path": "/abs/audio.mp3", "model": "tiny"}')
    for key in body:
        if key not in JOB_FIELDS:
            raise HTTPError(400, f"unknown field {key!r}; known fields: "
                                 f"{', '.join(JOB_FIELDS)}", key)
    allowed = settings.allow_dir

    path = _string(body, "path")
    if not path:
        raise HTTPError(400, "path is required: the absolute path of an audio file on "
                             "the whisperd host", "path")
    if not os.path.isabs(path):
        raise HTTPError(400, f"path must be absolute, got {path!r}", "path")
    if allowed and not _inside(path, allowed):
        raise HTTPError(403, f"path {path!r} is outside the folders whisperd may read "
                             f"(--allow-dir: {', '.join(allowed)})", "path")
    if not os.path.exists(path):
        raise HTTPError(400, f"no such file: {path}", "path")
    if not os.path.isfile(path):
        raise HTTPError(400, f"path is not a regular file: {path}", "path")
    if not os.access(path, os.R_OK):
        raise HTTPError(400, f"whisperd may not read {path}: check its permissions", "path")

    output_path = _string(body, "output_path")
    given = bool(output_path)
    output_path = os.path.normpath(output_path or os.path.dirname(path))
    if not os.path.isabs(output_path):
        raise HTTPError(400, f"output_path must be an absolute folder, got {output_path!r}",
                        "output_path")
    if allowed and not _inside(output_path, allowed):
        raise HTTPError(403, f"output_path {output_path!r} is outside the folders whisperd "
                             f"may write (--allow-dir: {', '.join(allowed)})", "output_path")
    if not os.path.isdir(output_path):
        raise HTTPError(400, f"output_path must be an existing folder: {output_path}",
                        "output_path")
    if not os.access(output_path, os.W_OK | os.X_OK):
        hint = "" if given else " (output_path was omitted, so output goes beside the audio)"
        raise HTTPError(400, f"whisperd may not write into {output_path}{hint}",
                        "output_path")

    model = _one_of(body, "model", MODELS, settings.default_model)
    language = _string(body, "language") or AUTO_LANGUAGE
    if language != AUTO_LANGUAGE and language not in LANGUAGES:
        raise HTTPError(400, f"language {language!r} is not supported; valid values: "
                             f"{AUTO_LANGUAGE} (detect), {', '.join(LANGUAGES)}", "language")
    if model.endswith(".en") and language not in ("en", AUTO_LANGUAGE):
        raise HTTPError(400, f"model {model} understands English only; use a multilingual "
                             f"model (like {model[:-3]}) for language {language!r}", "language")

    callback = _string(body, "callback")
    if callback:
        url = urllib.parse.urlsplit(callback)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise HTTPError(400, f"callback must be an absolute http:// or https:// URL, "
                                 f"got {callback!r}", "callback")

    options = {"task": _one_of(body, "task", TASKS, "transcribe"),
               "initial_prompt": _string(body, "initial_prompt")}
    for field in ("word_timestamps", "highlight_words"):
        value = body.get(field, False)
        if not isinstance(value, bool):
            raise HTTPError(400, f"{field} must be true or false", field)
        options[field] = value
    for field in ("max_line_width", "max_line_count"):
        value = body.get(field)
        if value is not None and (type(value) is not int or value < 1):
            raise HTTPError(400, f"{field} must be a whole number of at least 1", field)
        options[field] = value
    temperature = body.get("temperature", 0.0)
    if type(temperature) not in (int, float) or not 0 <= temperature <= 1:
        raise HTTPError(400, "temperature must be a number from 0 to 1", "temperature")
    options["temperature"] = float(temperature)
    for field in ("max_line_width", "max_line_count", "highlight_words"):
        if options[field] and not options["word_timestamps"]:
            raise HTTPError(400, f"{field} needs word_timestamps: true (as in the whisper "
                                 f"command line)", field)
    if model.endswith(".en") and options["task"] == "translate":
        raise HTTPError(400, f"model {model} cannot translate; use a multilingual model",
                        "task")

    return Job(id=str(uuid.uuid4()), path=path, language=language,
               format=_one_of(body, "format", FORMATS, "txt"), output_path=output_path,
               callback=callback, model=model, **options)


# ---------------------------------------------------------------------------------------
# Job store
# ---------------------------------------------------------------------------------------

class JobStore:
    """The durable record of every job that got its 201: SQLite in WAL mode.

    A job row is written before the client hears 201 and on every status change, each in
    its own committed transaction with synchronous=FULL, so a crash, `kill -9` or power
    loss at any moment leaves every accepted job on disk in its last state.
    """

    def __init__(self, state_dir):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "whisperd.sqlite3")
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                status TEXT NOT NULL,
                callback_status TEXT NOT NULL DEFAULT '',
                finished_at TEXT,
                doc TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, finished_at);
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            INSERT OR IGNORE INTO counters VALUES ('processed', 0);
        """)

    def _write(self, *statements):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @staticmethod
    def _row(job):
        return (job.status, job.callback_status, job.finished_at,
                json.dumps(job.to_json(), ensure_ascii=False), job.id)

    def insert(self, job):
        self._write(("INSERT INTO jobs (status, callback_status, finished_at, doc, id) "
                     "VALUES (?, ?, ?, ?, ?)", self._row(job)))

    def save(self, job, finished=False):
        statements = [("UPDATE jobs SET status=?, callback_status=?, finished_at=?, doc=? "
                       "WHERE id=?", self._row(job))]
        if finished:
            statements.append(("UPDATE counters SET value = value + 1 "
                               "WHERE name='processed'", ()))
        self._write(*statements)

    def delete(self, job_id, unless_pending=False):
        sql = "DELETE FROM jobs WHERE id=?"
        self._write((sql + (" AND callback_status != 'pending'" if unless_pending else ""),
                     (job_id,)))

    def _select(self, sql, args=()):
        with self.lock:
            return [Job.from_json(json.loads(doc)) for (doc,) in self.db.execute(sql, args)]

    def unfinished(self):
        return self._select("SELECT doc FROM jobs WHERE status IN (?, ?) ORDER BY seq",
                            (QUEUED, RUNNING))

    def last_finished(self, count):
        jobs = self._select("SELECT doc FROM jobs WHERE status IN (?, ?) "
                            "ORDER BY finished_at DESC, seq DESC LIMIT ?",
                            (COMPLETED, FAILED, count))
        return jobs[::-1]

    def pending_callbacks(self):
        return self._select("SELECT doc FROM jobs WHERE callback_status='pending' "
                            "ORDER BY finished_at")

    def prune(self, keep_ids):
        """Forgets finished jobs past the history, except those with a callback to send."""
        marks = ",".join("?" * len(keep_ids))
        self._write((f"DELETE FROM jobs WHERE status IN (?, ?) AND callback_status != "
                     f"'pending' AND id NOT IN ({marks or 'NULL'})",
                     (COMPLETED, FAILED, *keep_ids)))

    def processed(self):
        with self.lock:
            return self.db.execute("SELECT value FROM counters WHERE name='processed'"
                                   ).fetchone()[0]

    def close(self):
        with self.lock:
            self.db.close()


# ---------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------

# The `whisper` command line's decoding defaults (not whisper.transcribe()'s greedy ones),
# so a job's transcript is the one `whisper FILE` gives; both engines decode with them.
DECODING = {"beam_size": 5, "best_of": 5, "compression_ratio_threshold": 2.4,
            "no_speech_threshold": 0.6, "condition_on_previous_text": True}
LOGPROB_THRESHOLD = -1.0


def temperatures(start):
    """The CLI's fallback: from `start` up to 1.0 in steps of 0.2 (0.0 ... 1.0 by default)."""
    return tuple(round(start + 0.2 * i, 2) for i in range(int((1.0 - start) / 0.2 + 1e-6) + 1))


class Interrupted(Exception):
    """Raised inside a transcription to stop it; the job goes back to the queue."""


class JobFailed(Exception):
    """A job cannot be done, for a reason its owner can act on (the message says it)."""


class Engine:
    """Loads models once and keeps them (LRU, optional idle TTL); turns a job into
    whisper's result dict: {"text", "segments", "language"}.

    Engines are used by one worker thread only, so they need no locks of their own.
    """

    name = ""

    def __init__(self, settings):
        self.settings = settings
        self.models = collections.OrderedDict()   # name -> model, least recently used first
        self.last_used = {}
        self.device = settings.device
        self.loads = 0
        self.loading = False  # a first download may take longer than the watchdog allows

    def prepare(self):
        """Imports the heavy libraries and resolves the device (in the worker thread)."""

    def model(self, name):
        if name in self.models:
            self.models.move_to_end(name)
        else:
            while len(self.models) >= self.settings.max_models:
                self.unload(next(iter(self.models)))
            started = time.monotonic()
            self.loading = True
            try:
                self.models[name] = self.load(name)
            finally:
                self.loading = False
            self.loads += 1
            log(f"model {name} loaded on {self.device} in "
                f"{time.monotonic() - started:.1f} s ({self.name})")
        self.last_used[name] = time.monotonic()
        return self.models[name]

    def unload(self, name):
        self.models.pop(name, None)
        self.last_used.pop(name, None)
        gc.collect()
        self.release_memory()
        log(f"model {name} unloaded")

    def unload_idle(self):
        ttl = self.settings.model_ttl
        if ttl:
            for name, used in list(self.last_used.items()):
                if time.monotonic() - used > ttl:
                    self.unload(name)

    def release_memory(self):
        pass

    def load(self, name):
        raise NotImplementedError

    def transcribe(self, job, report):
        """Returns (result, audio seconds). Calls report(fraction done) as it goes."""
        raise NotImplementedError


_progress = threading.local()  # .report: the running job's progress callback


class OpenAIWhisperEngine(Engine):
    name = "openai-whisper"

    def prepare(self):
        import torch
        import tqdm
        import whisper
        self.torch, self.whisper = torch, whisper
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

        class ProgressBar(tqdm.tqdm):
            """Stands in for the bar inside whisper.transcribe(): prints nothing and
            reports the audio frames decoded so far to the running job."""

            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)
                self.frames = 0

            def update(self, n=1):
                self.frames += n
                report = getattr(_progress, "report", None)
                if report and self.total:
                    report(self.frames / self.total, self.total / 100)  # 100 frames/s

        # whisper.transcribe() does `import tqdm` and calls `tqdm.tqdm(...)`: give its
        # module a tqdm namespace whose bar is ours.
        sys.modules["whisper.transcribe"].tqdm = type(sys)("tqdm")
        sys.modules["whisper.transcribe"].tqdm.tqdm = ProgressBar

    def load(self, name):
        path = os.path.join(self.settings.model_dir, name + ".pt")
        try:
            if os.path.isfile(path):
                model = self.whisper.load_model(path, device=self.device)
                heads = getattr(self.whisper, "_ALIGNMENT_HEADS", {}).get(name)
                if heads:  # whisper only sets them for the checkpoints it downloads
                    try:
                        model.set_alignment_heads(heads)
                    except RuntimeError:  # a checkpoint of another shape: keep the default
                        log(f"model {path} is not OpenAI's {name}; word timings use "
                            f"whisper's default alignment heads")
                return model
            return self.whisper.load_model(name, device=self.device,
                                           download_root=self.settings.model_dir)
        except Exception as e:
            raise JobFailed(_load_error(name, path, os.path.isfile(path), e)) from e

    def release_memory(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    def transcribe(self, job, report):
        model = self.model(job.model)
        report(0.0)
        audio_seconds = []
        _progress.report = lambda done, total: (audio_seconds.append(total), report(done))
        try:
            audio = self.whisper.load_audio(job.path)
        except Exception as e:
            raise JobFailed(f"could not decode the audio in {job.path}: {_reason(e)}") from e
        try:
            result = self.whisper.transcribe(
                model, audio, verbose=None, fp16=self.device.startswith("cuda"),
                language=None if job.language == AUTO_LANGUAGE else job.language,
                task=job.task, initial_prompt=job.initial_prompt or None,
                word_timestamps=job.word_timestamps, logprob_threshold=LOGPROB_THRESHOLD,
                temperature=temperatures(job.temperature), **DECODING)
        finally:
            _progress.report = None
        return result, (audio_seconds[-1] if audio_seconds else len(audio) / 16000)


class FasterWhisperEngine(Engine):
    name = "faster-whisper"

    def prepare(self):
        import ctranslate2
        import faster_whisper
        self.faster_whisper = faster_whisper
        if self.device == "auto":
            self.device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.compute_type = self.settings.compute_type
        if self.compute_type == "auto":
            self.compute_type = "float16" if self.device.startswith("cuda") else "int8"

    def load(self, name):
        path = os.path.join(self.settings.model_dir, name)
        device, _, index = self.device.partition(":")
        try:
            model = self.faster_whisper.WhisperModel(
                path if os.path.isdir(path) else name, device=device,
                device_index=int(index or 0), compute_type=self.compute_type,
                download_root=self.settings.model_dir)
        except Exception as e:
            raise JobFailed(_load_error(name, path + "/", os.path.isdir(path), e)) from e
        if self.settings.batch_size:
            return self.faster_whisper.BatchedInferencePipeline(model)
        return model

    def transcribe(self, job, report):
        model = self.model(job.model)
        report(0.0)
        options = dict(DECODING, log_prob_threshold=LOGPROB_THRESHOLD,
                       language=None if job.language == AUTO_LANGUAGE else job.language,
                       task=job.task, initial_prompt=job.initial_prompt or None,
                       word_timestamps=job.word_timestamps,
                       temperature=list(temperatures(job.temperature)))
        if self.settings.batch_size:
            options["batch_size"] = self.settings.batch_size
        try:
            pieces, info = model.transcribe(job.path, **options)
        except Exception as e:
            if "audio" in type(e).__module__ or isinstance(e, (OSError, ValueError)):
                raise JobFailed(f"could not decode the audio in {job.path}: {_reason(e)}") from e
            raise
        segments = []
        for piece in pieces:  # a generator: decoding happens as we iterate
            segment = {"id": len(segments), "seek": piece.seek, "start": piece.start,
                       "end": piece.end, "text": piece.text, "tokens": piece.tokens,
                       "temperature": piece.temperature, "avg_logprob": piece.avg_logprob,
                       "compression_ratio": piece.compression_ratio,
                       "no_speech_prob": piece.no_speech_prob}
            if piece.words is not None:
                segment["words"] = [{"word": w.word, "start": w.start, "end": w.end,
                                     "probability": w.probability} for w in piece.words]
            segments.append(segment)
            if info.duration:
                report(min(piece.end / info.duration, 1.0))
        text = "".join(segment["text"] for segment in segments)
        return {"text": text, "segments": segments, "language": info.language}, info.duration


def _load_error(name, path, present, error):
    if present:
        return f"model {name} could not be loaded from {path}: {_reason(error)}"
    return (f"model {name} could not be loaded: it is not at {path} and could not be "
            f"downloaded there ({_reason(error)})")


def _reason(error):
    """A short, human reason from an exception (ffmpeg's last line, not its banner)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def write_outputs(result, job):
    """Writes the job's files with openai-whisper's own writers, each atomically.

    Every file is written to a hidden temp file in the output folder, flushed to disk and
    renamed over `<input name>.<ext>`, so a reader never sees half a file. Returns the TXT
    transcript, which is the job's `result`.
    """
    from whisper.utils import get_writer

    base = os.path.splitext(os.path.basename(job.path))[0]
    folder = job.output_path
    prefix, suffix = f".{base}.", ".whisperd-tmp"
    for name in os.listdir(folder):  # left by a daemon killed while writing this job
        if name.startswith(prefix) and name.endswith(suffix):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
    formats = WRITTEN_FORMATS if job.format == "all" else (job.format,)
    for ext in formats:
        writer = get_writer(ext, folder)
        fd, temp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                writer.write_result(result, file=file, **job.writer_options)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temp, 0o666 & ~UMASK)  # mkstemp makes 0600; honour the umask
            os.replace(temp, os.path.join(folder, f"{base}.{ext}"))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    with contextlib.suppress(OSError):  # make the renames themselves durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    text = io.StringIO()
    get_writer("txt", folder).write_result(result, file=text)
    return text.getvalue()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


# ---------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------

class Worker(threading.Thread):
    """The one thread that owns the models and runs jobs, in order, one at a time.

    Its whole life: take the next id off the queue; `service.take()` turns it into a
    RUNNING job unless it was deleted meanwhile; run it; never die of what a job raises.
    """

    TICK = 1.0  # seconds between idle housekeeping rounds (TTL, watchdog)

    def __init__(self, service, engine):
        super().__init__(name="worker", daemon=True)
        self.service, self.engine = service, engine
        self.stopping = threading.Event()   # take no further job
        self.abort = threading.Event()      # interrupt the running job
        self.beat = time.monotonic()        # last sign of life, for the watchdog
        self.ready = False
        self.prepare_error = None

    def run(self):
        try:
            self.engine.prepare()
        except Exception as e:  # e.g. torch missing: every job will say so
            self.prepare_error = f"the {self.engine.name} engine cannot start: {_reason(e)}"
            log(self.prepare_error)
        self.ready = True
        while not self.stopping.is_set():
            self.beat = time.monotonic()
            try:
                job_id = self.service.queue.get(timeout=self.TICK)
            except queue.Empty:
                self.engine.unload_idle()
                continue
            if job_id is None or self.stopping.is_set():
                break
            job = self.service.take(job_id)
            if job is not None:
                self.run_job(job)

    def report(self, job, done):
        self.beat = time.monotonic()
        if self.abort.is_set():
            raise Interrupted()
        self.service.progress(job, done)

    def run_job(self, job):
        started = time.monotonic()
        try:
            if self.prepare_error:
                raise JobFailed(self.prepare_error)
            result, audio_seconds = self.engine.transcribe(job, lambda done: self.report(job, done))
            text = write_outputs(result, job)
        except Interrupted:
            self.service.requeue(job)
            return
        except JobFailed as e:
            self.service.finish(job, FAILED, error=str(e), Duration=_since(started))
            return
        except Exception as e:  # anything else is still only this job's failure
            log(f"job {job.id} raised: " + "".join(traceback.format_exception_only(e)).strip())
            self.service.finish(job, FAILED, error=f"transcription failed: {type(e).__name__}: "
                                                   f"{_reason(e)}", Duration=_since(started))
            return
        language = result.get("language") or job.language
        self.service.finish(job, COMPLETED, result=text, language=language,
                            Duration=_since(started), audio_duration=round(audio_seconds, 3))


def _since(started):
    return round(time.monotonic() - started, 3)


# ---------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------

def sign(secret, body):
    """The X-Whisperd-Signature value: sha256=<hex HMAC-SHA256 of the raw body>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Callbacks:
    """Delivers each finished job's JSON to its callback URL, off the worker thread.

    Deliveries are retried with exponential backoff and jitter on connection errors,
    timeouts, 5xx and 429 (a Retry-After is honoured); any other answer is final. Each
    attempt runs on a small pool, so a slow receiver holds up neither the worker nor
    another job's callback. Pending deliveries are in the job store and resume on start.
    """

    def __init__(self, service, settings):
        self.service, self.settings = service, settings
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="callback")
        self.due = []                      # heap of (when, seq, job)
        self.seq = 0
        self.wake = threading.Condition()
        self.stopping = False
        self.in_flight = 0
        self.thread = threading.Thread(target=self.run, name="callbacks", daemon=True)

    def start(self):
        self.thread.start()

    def schedule(self, job, delay=0.0):
        with self.wake:
            self.seq += 1
            heapq.heappush(self.due, (time.monotonic() + delay, self.seq, job))
            self.wake.notify()

    def run(self):
        while True:
            with self.wake:
                while not self.stopping and (not self.due or self.due[0][0] > time.monotonic()):
                    self.wake.wait(self.due[0][0] - time.monotonic() if self.due else None)
                if self.stopping:
                    return
                _, _, job = heapq.heappop(self.due)
                self.in_flight += 1
            self.pool.submit(self.attempt, job)

    def attempt(self, job):
        try:
            body = json.dumps(job.to_json(), ensure_ascii=False).encode()
            outcome, retry_after = self.deliver(job, body, job.callback_attempts + 1)
            attempts = job.callback_attempts + 1
            retry = outcome.startswith("retry") and attempts < self.settings.callback_attempts
            status = "pending" if retry else ("delivered" if outcome.startswith("delivered") else "failed")
            self.service.callback_outcome(job, status, attempts, outcome)
            if retry:
                backoff = self.settings.callback_backoff * 2 ** (attempts - 1)
                delay = max(retry_after or 0, backoff * random.uniform(0.8, 1.2))
                self.schedule(job, min(delay, 3600))
        except Exception as e:  # a bug here must not silently drop the delivery
            log(f"job {job.id} callback error: {type(e).__name__}: {e}")
        finally:
            with self.wake:
                self.in_flight -= 1
                self.wake.notify_all()

    def deliver(self, job, body, attempt):
        """One POST. Returns (outcome, Retry-After seconds); outcome starts with
        'delivered', 'retry' or 'final'."""
        headers = {"Content-Type": "application/json", "User-Agent": f"whisperd/{__version__}",
                   "X-Whisperd-Job": job.id, "X-Whisperd-Attempt": str(attempt)}
        if self.settings.callback_secret:
            headers["X-Whisperd-Signature"] = sign(self.settings.callback_secret, body)
        request = urllib.request.Request(job.callback, data=body, headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.callback_timeout) as r:
                return f"delivered (HTTP {r.status})", None
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                return f"retry (HTTP {e.code})", _retry_after(e.headers.get("Retry-After"))
            return f"final (HTTP {e.code})", None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            return f"retry ({reason})", None

    def stop(self, wait=5.0):
        """Stops scheduling; waits a little for deliveries already on the wire."""
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
            self.wake.wait_for(lambda: self.in_flight == 0, timeout=wait)
        self.pool.shutdown(wait=False, cancel_futures=True)


def _retry_after(value):
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# Service: the jobs, in memory and on disk
# ---------------------------------------------------------------------------------------

class Service:
    """Holds the jobs and is the one place that changes them.

    `jobs` holds the queued and running jobs and the last `--history` finished ones, in
    the order they were created; every status change goes through `_change()`, which
    persists it, counts it, wakes waiters and logs it.
    """

    def __init__(self, settings):
        self.settings = settings
        self.store = JobStore(settings.state_dir)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.jobs = {}
        self.finished = collections.deque()   # ids of the finished jobs kept, oldest first
        self.counts = collections.Counter()
        self.processed = self.store.processed()
        self.queue = queue.Queue()
        self.accepting = True
        self.closed = False   # once set, nothing more is written (see serve())
        self.started = time.monotonic()
        self.metrics = collections.Counter()
        self.callbacks = Callbacks(self, settings)
        self.engine = (FasterWhisperEngine if settings.engine == "faster-whisper"
                       else OpenAIWhisperEngine)(settings)
        self.worker = Worker(self, self.engine)
        self._recover()

    def _recover(self):
        """Loads the store: queued jobs queue again, interrupted ones run again.

        Uploads (/v1/audio/*) are the exception: their client waited on the connection,
        which the restart closed, so their files are removed and their jobs FAILED.
        """
        self.uploads = os.path.join(self.settings.state_dir, "uploads")
        shutil.rmtree(self.uploads, ignore_errors=True)
        os.makedirs(self.uploads)
        for job in self.store.last_finished(self.settings.history):
            self.jobs[job.id] = job
            self.finished.append(job.id)
        self.store.prune(list(self.finished))
        for job in self.store.unfinished():
            self.jobs[job.id] = job
            self.counts[job.status] += 1
            if _inside(job.path, [self.uploads]):
                self.finish(job, FAILED, error="whisperd restarted while this upload was "
                                               "waiting; its client was disconnected")
                continue
            if job.status == RUNNING:
                if job.attempts >= self.settings.max_attempts:
                    self.finish(job, FAILED, error=(
                        f"whisperd stopped while running this job {job.attempts} times "
                        f"(crash, kill or power loss); giving up after --max-attempts="
                        f"{self.settings.max_attempts}"))
                    continue
                self._change(job, QUEUED, f"requeued after an interrupted run "
                                          f"(attempt {job.attempts} of "
                                          f"{self.settings.max_attempts})", progress=0)
            self.queue.put(job.id)
        self.jobs = dict(sorted(self.jobs.items(), key=lambda item: item[1].created_at))
        for job in self.store.pending_callbacks():
            self.callbacks.schedule(self.jobs.get(job.id, job))

    def start(self):
        self.worker.start()
        self.callbacks.start()

    # -- the one place jobs change ------------------------------------------------------

    def _change(self, job, status, event, finished=False, **changes):
        with self.lock:
            if self.closed:
                return
            self.counts[job.status] -= 1
            self.counts[status] += 1
            job.status = status
            vars(job).update(changes)
            self.store.save(job, finished=finished)
            if finished:
                self.processed += 1
                self.finished.append(job.id)
                while len(self.finished) > self.settings.history:
                    old = self.jobs.pop(self.finished.popleft())
                    self.store.delete(old.id, unless_pending=True)
            self.changed.notify_all()
        log(f"job {job.id} {event}")

    def submit(self, job):
        with self.lock:
            if not self.accepting:
                raise HTTPError(503, "whisperd is shutting down and takes no new jobs; "
                                     "retry once it is back", headers={"Retry-After": "10"})
            if self.counts[QUEUED] >= self.settings.max_queue:
                raise HTTPError(503, f"the queue is full ({self.settings.max_queue} jobs "
                                     f"waiting); retry later", headers={"Retry-After": "30"})
            self.store.insert(job)
            self.jobs[job.id] = job
            self.counts[QUEUED] += 1
            self.queue.put(job.id)
        log(f"job {job.id} queued: {job.path} -> {job.output_path} "
            f"(model {job.model}, format {job.format})")
        return job

    def take(self, job_id):
        """The worker's claim on a queued job; None if it was deleted meanwhile."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.status != QUEUED:
                return None
            self._change(job, RUNNING, f"running (attempt {job.attempts + 1})",
                         attempts=job.attempts + 1, started_at=utcnow(), progress=0)
            return job

    def progress(self, job, done):
        percent = min(99, int(done * 100))  # 100 is for COMPLETED
        if percent != job.progress:
            with self.lock:
                job.progress = percent

    def requeue(self, job):
        """A run cut short by shutdown is not the job's fault: it does not count."""
        self._change(job, QUEUED, "interrupted by shutdown; it runs again on start",
                     attempts=job.attempts - 1, progress=0, started_at=None)

    def finish(self, job, status, **changes):
        with self.lock:
            if job.callback:
                changes["callback_status"] = "pending"
            changes.setdefault("finished_at", utcnow())
            if status == COMPLETED:
                changes["progress"] = 100
            event = (f"completed in {changes.get('Duration', 0)} s" if status == COMPLETED
                     else f"failed: {changes.get('error')}")
            self._change(job, status, event, finished=True, **changes)
            self.metrics[f"jobs_{status.lower()}"] += 1
            self.metrics["audio_seconds"] += changes.get("audio_duration") or 0
            self.metrics["transcription_seconds"] += changes.get("Duration") or 0
        if job.callback:
            self.callbacks.schedule(job)

    def callback_outcome(self, job, status, attempts, outcome):
        with self.lock:
            if self.closed:
                return
            job.callback_status, job.callback_attempts = status, attempts
            if job.id in self.jobs:
                self.store.save(job)
            elif status == "pending":
                self.store.save(job)
            else:  # past the history already: its record was only kept for this
                self.store.delete(job.id)
            self.metrics[f"callbacks_{outcome.split()[0]}"] += 1
        log(f"job {job.id} callback {status}: {outcome}, attempt {attempts} to {job.callback}")

    def delete(self, job_id):
        with self.lock:
            job = self.get(job_id)
            if job.status != QUEUED:
                raise HTTPError(409, f"job {job_id} is {job.status}; only QUEUED jobs can be "
                                     f"deleted")
            del self.jobs[job_id]
            self.counts[QUEUED] -= 1
            self.store.delete(job_id)
            self.changed.notify_all()
        log(f"job {job_id} deleted")
        return job

    # -- reading ------------------------------------------------------------------------

    def get(self, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPError(404, f"no job {job_id}: it never existed, was deleted, or "
                                 f"finished more than {self.settings.history} jobs ago")
        return job

    def wait(self, job_id, seconds):
        """Holds until the job has finished, at most `seconds` (None: no limit)."""
        with self.changed:
            job = self.get(job_id)
            self.changed.wait_for(lambda: job.status in FINISHED or
                                  self.jobs.get(job_id) is not job, timeout=seconds)
            if job.status not in FINISHED:
                job = self.get(job_id)  # 404 if it was deleted meanwhile
            return job.to_json()

    def snapshot(self, job_id=None):
        with self.lock:
            if job_id is not None:
                return self.get(job_id).to_json()
            return [job.to_json() for job in self.jobs.values()]

    def stats(self):
        with self.lock:
            return {"Queued": self.counts[QUEUED], "Running": self.counts[RUNNING],
                    "Processed": self.processed}

    def running_job(self):
        with self.lock:
            return next((j for j in self.jobs.values() if j.status == RUNNING), None)

    def close(self):
        """Writes nothing more; a job still running stays as the store last saw it."""
        with self.lock:
            self.closed = True
            self.store.close()


# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------

def route(method, pattern):
    """Marks a Handler method as the answer to METHOD on a path matching `pattern`."""
    def mark(function):
        function.route = (method, re.compile(pattern + "/?"))
        return function
    return mark


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the `@route` methods below; every answer is JSON but /smi's and
    /metrics' text. Errors are raised as HTTPError and turned into JSON in one place."""

    server_version = f"whisperd/{__version__}"
    protocol_version = "HTTP/1.1"        # keep-alive
    disable_nagle_algorithm = True       # headers and body leave without a 40 ms stall
    timeout = CONNECTION_TIMEOUT         # an idle or slow client cannot hold a thread
    default_request_version = "HTTP/1.0"  # garbage gets a status line, not HTTP/0.9's bare body

    @property
    def service(self):
        return self.server.service

    # -- dispatch -----------------------------------------------------------------------

    def handle_request(self):
        try:
            url = urllib.parse.urlsplit(self.path)
            self.query = urllib.parse.parse_qs(url.query)
            self.check_token()
            answer, params = self.find_route(url.path)
            status, payload, *headers = answer(self, *params)
            self.respond(status, payload, **(headers[0] if headers else {}))
        except HTTPError as e:
            if self.path.startswith("/v1/"):  # OpenAI's error shape, which its SDKs read
                body = {"error": {"message": e.message, "param": e.field, "code": None,
                                  "type": "invalid_request_error" if e.status < 500
                                  else "server_error"}}
            else:
                body = {"error": e.message, **({"field": e.field} if e.field else {})}
            self.respond(e.status, body, **e.headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log(f"internal error on {self.command} {self.path}:\n{traceback.format_exc()}")
            self.respond(500, {"error": "internal error; the daemon's log says more"})

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = do_HEAD = handle_request

    def find_route(self, path):
        allowed = []
        for method, pattern, answer in ROUTES:
            match = pattern.fullmatch(path)
            if match:
                if method == self.command:
                    return answer, match.groups()
                allowed.append(method)
        if allowed:
            raise HTTPError(405, f"{self.command} is not allowed on {path}; use "
                                 f"{', '.join(allowed)}", headers={"Allow": ", ".join(allowed)})
        raise HTTPError(404, f"no such endpoint: {path}; see GET /openapi.json")

    def check_token(self):
        token = self.server.settings.token
        if not token:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                                    token.encode())):
            raise HTTPError(401, "missing or wrong token: send 'Authorization: Bearer "
                                 "<token>' (whisperd --token)",
                            headers={"WWW-Authenticate": 'Bearer realm="whisperd"'})

    def respond(self, status, payload, content_type=None, **headers):
        if isinstance(payload, str):
            body = payload.encode()
            content_type = content_type or "text/plain; charset=utf-8"
        else:
            body = json.dumps(payload, ensure_ascii=False).encode()
            content_type = content_type or "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_json(self):
        raw = self.read_body(MAX_BODY)
        try:
            return json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None

    def read_body(self, limit):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HTTPError(411, "send the body with a Content-Length; chunked transfer "
                                 "encoding is not supported")
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HTTPError(411, "a Content-Length header is required") from None
        if length > limit:
            self.close_connection = True  # the unread body must not be parsed as a request
            raise HTTPError(413, f"the body is {length} bytes; at most {limit} are accepted")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ConnectionError("client closed the connection mid-body")
        return raw

    # -- the original API ---------------------------------------------------------------

    @route("POST", r"/transcription/job")
    def post_job(self):
        job = self.service.submit(validate(self.read_json(), self.server.settings))
        return 201, job.to_json(), {"Location": f"/transcription/job/{job.id}"}

    @route("GET", r"/transcription/job/([^/]+)")
    def get_job(self, job_id):
        if "wait" not in self.query:
            return 200, self.service.snapshot(job_id)
        try:
            seconds = float(self.query["wait"][-1])
            if not 0 <= seconds < math.inf:
                raise ValueError
        except ValueError:
            raise HTTPError(400, "wait must be a number of seconds (at most 60)", "wait") from None
        return 200, self.service.wait(job_id, min(seconds, MAX_WAIT))

    @route("DELETE", r"/transcription/job/([^/]+)")
    def delete_job(self, job_id):
        return 200, {**self.service.delete(job_id).to_json(), "deleted": True}

    @route("GET", r"/transcription/jobs")
    def list_jobs(self):
        return 200, self.service.snapshot()

    @route("GET", r"/smi")
    def smi(self):
        try:
            done = subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                  timeout=SMI_TIMEOUT, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return 503, "nvidia-smi is not installed on this host (no NVIDIA driver?)\n"
        except subprocess.TimeoutExpired:
            return 503, f"nvidia-smi did not answer within {SMI_TIMEOUT:.0f} s\n"
        except OSError as e:
            return 503, f"nvidia-smi could not run: {e}\n"
        if done.returncode != 0:
            return 503, f"nvidia-smi failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
        return 200, done.stdout

    @route("GET", r"/stats")
    def stats(self):
        return 200, self.service.stats()

    # -- OpenAI's audio API -------------------------------------------------------------

    @route("POST", r"/v1/audio/(transcriptions|translations)")
    def openai_audio(self, kind):
        """OpenAI's `audio.transcriptions.create` and `audio.translations.create`, answered
        synchronously: the upload becomes an ordinary job in the same queue."""
        form = self.read_form()
        upload = form.get("file")
        if not isinstance(upload, tuple):
            raise HTTPError(400, "send the audio as a multipart file field named 'file'", "file")
        response_format = _one_of(form, "response_format", OPENAI_FORMATS, "json")
        granularities = form.get("timestamp_granularities[]", [])
        granularities = [granularities] if isinstance(granularities, str) else granularities
        for value in granularities:
            if value not in ("word", "segment"):
                raise HTTPError(400, f"timestamp_granularities[] {value!r} is not supported; "
                                     f"valid values: word, segment", "timestamp_granularities[]")
        try:
            temperature = float(form.get("temperature") or 0)
        except (TypeError, ValueError):
            raise HTTPError(400, "temperature must be a number from 0 to 1", "temperature") \
                from None
        model = form.get("model") if isinstance(form.get("model"), str) else ""
        folder = tempfile.mkdtemp(dir=self.service.uploads)
        try:
            name = "audio" + os.path.splitext(os.path.basename(upload[0] or ""))[1][:16]
            audio = os.path.join(folder, name)
            with open(audio, "wb") as file:
                file.write(upload[1])
            job = self.service.submit(validate({
                "path": audio, "output_path": folder, "format": "json",
                "model": "" if model.startswith(("whisper-", "gpt-")) else model,
                "language": form.get("language") or None, "initial_prompt": form.get("prompt"),
                "task": "translate" if kind == "translations" else "transcribe",
                "word_timestamps": "word" in granularities, "temperature": temperature,
            }, self.server.settings))
            done = self.service.wait(job.id, None)
            if done["status"] != COMPLETED:
                raise HTTPError(400 if "decode" in done["error"] else 500, done["error"])
            with open(os.path.join(folder, "audio.json"), encoding="utf-8") as file:
                result = json.load(file)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return 200, *openai_answer(result, done, response_format)

    def read_form(self):
        """A multipart/form-data body as {name: text, or [texts], or (filename, bytes)}."""
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPError(400, "send the body as multipart/form-data, as OpenAI's clients do")
        limit = int(self.server.settings.max_upload * 1024 * 1024)
        raw = self.read_body(limit)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        if not message.is_multipart():
            raise HTTPError(400, "the multipart body could not be read")
        form = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            value = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                form[name] = (part.get_filename(), value)
            else:
                text = value.decode("utf-8", "replace")
                form[name] = form[name] + [text] if isinstance(form.get(name), list) else \
                    ([form[name], text] if name in form else text)
        return form

    # -- operations ---------------------------------------------------------------------

    @route("GET", r"/health")
    def health(self):
        service, engine = self.service, self.service.engine
        body = {"status": "ok" if service.accepting else "shutting down",
                "version": __version__, "engine": engine.name, "device": engine.device,
                "models_loaded": list(engine.models), "worker_ready": service.worker.ready,
                **service.stats(), "uptime": round(time.monotonic() - service.started, 1)}
        return (200 if service.accepting else 503), body

    @route("GET", r"/openapi.json")
    def openapi(self):
        return 200, OPENAPI

    @route("GET", r"/metrics")
    def metrics(self):
        return 200, prometheus_text(self.service), \
            {"content_type": "text/plain; version=0.0.4; charset=utf-8"}

    # -- quiet under abuse --------------------------------------------------------------

    def send_error(self, code, message=None, explain=None):
        # The stdlib's own errors (bad request line, headers too long...) as JSON too.
        self.close_connection = True
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else ""
        message = message or phrase
        self.respond(code, {"error": message if len(message) < 200 else message[:200] + "..."})

    def log_message(self, format, *args):
        pass  # no access log: a job's events are logged, requests are not

    def log_error(self, format, *args):
        message = format % args
        if "timed out" not in message:
            log(f"client {self.client_address[0]}: {message}"[:200])


ROUTES = [(f.route[0], f.route[1], f) for f in vars(Handler).values() if hasattr(f, "route")]


def prometheus_text(service):
    """/metrics in Prometheus' text format."""
    with service.lock:
        m, counts = service.metrics, dict(service.counts)
        loads = service.engine.loads
    lines = []

    def metric(name, kind, help, samples):
        lines.append(f"# HELP whisperd_{name} {help}")
        lines.append(f"# TYPE whisperd_{name} {kind}")
        for labels, value in samples:
            lines.append(f"whisperd_{name}{labels} {value}")

    metric("jobs_finished_total", "counter", "Jobs finished since start, by final status.",
           [(f'{{status="{s}"}}', m[f"jobs_{s.lower()}"]) for s in FINISHED])
    metric("jobs", "gauge", "Jobs now queued or running.",
           [(f'{{status="{s}"}}', counts.get(s, 0)) for s in (QUEUED, RUNNING)])
    metric("queue_length", "gauge", "Jobs waiting in the queue.", [("", counts.get(QUEUED, 0))])
    metric("audio_seconds_total", "counter", "Seconds of audio transcribed.",
           [("", round(m["audio_seconds"], 3))])
    metric("transcription_seconds_total", "counter", "Seconds spent transcribing.",
           [("", round(m["transcription_seconds"], 3))])
    metric("callbacks_total", "counter", "Callback delivery attempts, by outcome.",
           [(f'{{outcome="{o}"}}', m[f"callbacks_{o}"]) for o in ("delivered", "retry", "final")])
    metric("model_loads_total", "counter", "Models loaded.", [("", loads)])
    return "\n".join(lines) + "\n"


OPENAI_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def _openapi():
    """GET /openapi.json: every endpoint, request and response, as OpenAPI 3.1."""
    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def nullable(kind, **more):
        return {"type": [kind, "null"], **more}

    def answer(description, schema=None, text=False, **more):
        media = "text/plain" if text else "application/json"
        return {"description": description,
                **({"content": {media: {"schema": schema or {"type": "string"}}}}
                   if schema or text else {}), **more}

    def errors(*codes, schema="Error"):
        meaning = {400: "Invalid input; `field` names it", 401: "Missing or wrong token",
                   403: "Outside --allow-dir", 404: "No such job", 409: "Job not QUEUED",
                   411: "No Content-Length", 413: "Body too large",
                   500: "The job failed", 503: "Queue full or shutting down"}
        return {str(c): answer(meaning[c], ref(schema)) for c in codes + (401,)}

    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    string = {"type": "string"}
    job_properties = {
        "path": {"type": "string", "description": "Absolute path of an audio file on the host"},
        "language": nullable("string", enum=["", AUTO_LANGUAGE, *LANGUAGES, None]),
        "format": nullable("string", enum=["", *FORMATS, None]),
        "output_path": nullable("string", description="An existing folder; default: the "
                                                      "audio's folder"),
        "callback": nullable("string", pattern="^https?://[^/]"),
        "model": nullable("string", enum=["", *MODELS, None]),
        "task": nullable("string", enum=["", *TASKS, None]),
        "initial_prompt": nullable("string"),
        "word_timestamps": {"type": "boolean"},
        "max_line_width": nullable("integer", minimum=1),
        "max_line_count": nullable("integer", minimum=1),
        "highlight_words": {"type": "boolean"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    }
    job = {"type": "object", "required": list(vars(Job("", "", "", "", "", "", ""))),
           "properties": {
               "id": string, "path": string, "language": string,
               "format": {"type": "string", "enum": list(FORMATS)}, "output_path": string,
               "progress": {"type": "integer", "minimum": 0, "maximum": 100},
               "status": {"type": "string", "enum": [QUEUED, RUNNING, COMPLETED, FAILED]},
               "result": string, "callback": string, "model": string,
               "Duration": {"type": "number"}, "error": string, "created_at": string,
               "started_at": nullable("string"), "finished_at": nullable("string"),
               "attempts": {"type": "integer"}, "audio_duration": nullable("number"),
               "callback_status": {"type": "string",
                                   "enum": ["", "pending", "delivered", "failed"]},
               "callback_attempts": {"type": "integer"}, "task": string,
               "initial_prompt": string, "word_timestamps": {"type": "boolean"},
               "max_line_width": nullable("integer"), "max_line_count": nullable("integer"),
               "highlight_words": {"type": "boolean"}, "temperature": {"type": "number"}}}
    counts = {k: {"type": "integer"} for k in ("Queued", "Running", "Processed")}
    audio_form = {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "model": string,
        "language": string, "prompt": string,
        "response_format": {"type": "string", "enum": list(OPENAI_FORMATS)},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "timestamp_granularities[]": {"type": "array",
                                      "items": {"type": "string", "enum": ["word", "segment"]}}}}
    audio = {"requestBody": {"required": True,
                             "content": {"multipart/form-data": {"schema": audio_form}}},
             "responses": {"200": {"description": "The transcript, in response_format",
                                   "content": {"application/json": {"schema": {"type": "object"}},
                                               "text/plain": {"schema": string}}},
                           **errors(400, 411, 413, 500, 503, schema="OpenAIError")}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "whisperd", "version": __version__,
                 "description": "Whisper speech-to-text behind a small HTTP job API."},
        "paths": {
            "/transcription/job": {"post": {
                "summary": "Create a job",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["path"],
                               "properties": job_properties, "additionalProperties": False}}}},
                "responses": {"201": answer("Created", ref("Job"), headers={"Location": {
                    "schema": string, "description": "/transcription/job/{id}"}}),
                    **errors(400, 403, 411, 413, 503)}}},
            "/transcription/job/{id}": {
                "get": {"summary": "A job", "parameters": [job_id, {
                    "name": "wait", "in": "query", "required": False,
                    "description": "Hold up to this many seconds (at most 60) until it finished",
                    "schema": {"type": "number", "minimum": 0}}],
                    "responses": {"200": answer("The job", ref("Job")), **errors(400, 404)}},
                "delete": {"summary": "Delete a QUEUED job", "parameters": [job_id],
                           "responses": {"200": answer("The job as it was, and deleted: true", {
                               "allOf": [ref("Job"), {"type": "object", "required": ["deleted"],
                                   "properties": {"deleted": {"const": True}}}]}),
                               **errors(404, 409)}}},
            "/transcription/jobs": {"get": {
                "summary": "Queued and running jobs and the last --history finished ones",
                "responses": {"200": answer("Oldest first", {"type": "array", "items": ref("Job")}),
                              **errors()}}},
            "/stats": {"get": {"summary": "Counts", "responses": {
                "200": answer("Counts", {"type": "object", "properties": counts,
                                         "required": list(counts)}), **errors()}}},
            "/smi": {"get": {"summary": "nvidia-smi's output, for a person", "responses": {
                "200": answer("nvidia-smi's text", text=True),
                "503": answer("No nvidia-smi, or it failed", text=True), **errors()}}},
            "/health": {"get": {"summary": "Liveness and what is loaded", "responses": {
                "200": answer("Serving", ref("Health")),
                "503": answer("Shutting down", ref("Health")), **errors()}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": answer("Prometheus text format", text=True), **errors()}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": answer("OpenAPI 3.1", {"type": "object"}), **errors()}}},
            "/v1/audio/transcriptions": {"post": {"summary": "OpenAI-compatible", **audio}},
            "/v1/audio/translations": {"post": {"summary": "OpenAI-compatible", **audio}},
        },
        "components": {
            "schemas": {
                "Job": job,
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": string, "field": string}},
                "OpenAIError": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "object", "required": ["message", "type"], "properties": {
                        "message": string, "type": string, "param": nullable("string"),
                        "code": {"type": "null"}}}}},
                "Health": {"type": "object", "required": ["status", "engine", "device"],
                           "properties": {"status": string, "engine": string, "device": string,
                                          "models_loaded": {"type": "array", "items": string},
                                          **counts}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
    }


OPENAPI = _openapi()


def openai_answer(result, job, response_format):
    """(body, headers) in OpenAI's shape for one response_format, from whisper's result."""
    if response_format in ("srt", "vtt"):
        from whisper.utils import get_writer
        text = io.StringIO()
        get_writer(response_format, ".").write_result(result, file=text)
        return text.getvalue(), {"content_type": "text/plain; charset=utf-8"}
    if response_format == "text":
        return job["result"], {"content_type": "text/plain; charset=utf-8"}
    text = result["text"].strip()
    if response_format == "json":
        return {"text": text}, {}
    from whisper.tokenizer import LANGUAGES as NAMES
    keys = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
            "compression_ratio", "no_speech_prob")
    body = {"task": job["task"], "language": NAMES.get(job["language"], job["language"]),
            "duration": job["audio_duration"], "text": text,
            "segments": [{k: segment[k] for k in keys} for segment in result["segments"]]}
    if job["word_timestamps"]:
        body["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"]}
                         for segment in result["segments"] for w in segment.get("words", [])]
    return body, {}


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer, bound to the service, quiet about clients that go away."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, settings, service):
        self.settings, self.service = settings, service
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        super().__init__((settings.host, settings.port), Handler)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # resets, broken pipes, timeouts: one short line
            log(f"client {client_address[0]}: {type(error).__name__}: {error}"[:200])
        else:
            super().handle_error(request, client_address)


# ---------------------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------------------

def sd_notify(message):
    """Tells systemd (Type=notify) how we are, over $NOTIFY_SOCKET; silent without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())


def watchdog_interval():
    """Half of WatchdogSec=, in seconds, or None when systemd asked for no pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


# ---------------------------------------------------------------------------------------
# Client: whisperd submit | status | jobs
# ---------------------------------------------------------------------------------------

CLIENT_COMMANDS = ("submit", "status", "jobs")


class Client:
    """Talks to a running whisperd at $WHISPERD_URL with $WHISPERD_TOKEN."""

    def __init__(self):
        self.url = os.environ.get("WHISPERD_URL", "http://127.0.0.1:9000").rstrip("/")
        self.token = os.environ.get("WHISPERD_TOKEN")

    def call(self, method, path, body=None):
        """Returns (status, JSON answer); exits with status 2 when whisperd is unreachable."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=90) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.load(e)
            except ValueError:
                return e.code, {"error": f"HTTP {e.code}"}
        except (urllib.error.URLError, OSError) as e:
            sys.exit(f"whisperd: cannot reach {self.url}: {getattr(e, 'reason', e)}")


def client_main(argv):
    parser = argparse.ArgumentParser(
        prog="whisperd", description="Talk to a running whisperd ($WHISPERD_URL, default "
                                     "http://127.0.0.1:9000; $WHISPERD_TOKEN).")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="queue audio files; print their job ids")
    submit.add_argument("files", nargs="+", metavar="FILE")
    for name in ("model", "format", "language", "output-path", "callback"):
        submit.add_argument(f"--{name}")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the jobs, with a progress bar on a terminal; print the "
                             "transcripts (txt) or where the files went")
    commands.add_parser("status", help="one job, as JSON").add_argument("id")
    commands.add_parser("jobs", help="the queued, running and recently finished jobs")
    args = parser.parse_args(argv)
    client = Client()

    if args.command == "status":
        status, job = client.call("GET", f"/transcription/job/{args.id}")
        if status != 200:
            sys.exit(f"whisperd: {job['error']}")
        print(json.dumps(job, indent=2, ensure_ascii=False))
        return 1 if job["status"] == FAILED else 0
    if args.command == "jobs":
        status, jobs = client.call("GET", "/transcription/jobs")
        if status != 200:
            sys.exit(f"whisperd: {jobs['error']}")
        for job in jobs:
            print(f"{job['id']}  {job['status']:<9} {job['progress']:>3}%  {job['path']}")
        return 0

    jobs, exit_status = [], 0
    options = {k: v for k, v in (("model", args.model), ("format", args.format),
                                 ("language", args.language), ("output_path", args.output_path),
                                 ("callback", args.callback)) if v}
    for file in args.files:
        status, job = client.call("POST", "/transcription/job",
                                  {"path": os.path.abspath(file), **options})
        if status != 201:
            print(f"whisperd: {file}: {job['error']}", file=sys.stderr)
            exit_status = 2
            continue
        jobs.append(job)
        if not args.wait:
            print(job["id"])
    if args.wait and jobs:
        exit_status = max(exit_status, watch(client, jobs))
    return exit_status


def watch(client, jobs):
    """Waits for the jobs, a progress bar each on a terminal; prints what they made."""
    bars = {}
    if sys.stderr.isatty():
        import tqdm
        width = shutil.get_terminal_size().columns  # tqdm draws nothing on a 0-wide tty
        bars = {job["id"]: tqdm.tqdm(total=100, position=i, desc=os.path.basename(job["path"]),
                                     ncols=width,
                                     bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
                for i, job in enumerate(jobs)}
    pending = {job["id"]: job for job in jobs}
    while pending:
        for job_id in list(pending):
            status, job = client.call("GET", f"/transcription/job/{job_id}"
                                             + ("" if bars else "?wait=30"))
            if status != 200:
                job = dict(pending[job_id], status=FAILED, error=job["error"])
            if job_id in bars:
                bars[job_id].n = job["progress"]
                bars[job_id].set_postfix_str(job["status"].lower())
            if job["status"] in FINISHED:
                pending.pop(job_id)
                jobs[[j["id"] for j in jobs].index(job_id)] = job
        if pending and bars:
            time.sleep(0.25)
    for bar in bars.values():
        bar.close()
    failed = 0
    for job in jobs:
        if job["status"] == FAILED:
            failed = 1
            print(f"whisperd: {job['path']}: FAILED: {job['error']}", file=sys.stderr)
        elif job["format"] == "txt":
            print(job["result"], end="")
        else:
            base = os.path.join(job["output_path"],
                                os.path.splitext(os.path.basename(job["path"]))[0])
            formats = WRITTEN_FORMATS if job["format"] == "all" else (job["format"],)
            print("\n".join(f"{base}.{ext}" for ext in formats))
    return failed


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------

def lock_state_dir(state_dir):
    """One daemon per state folder: two would run the same jobs twice."""
    os.makedirs(state_dir, exist_ok=True)
    handle = open(os.path.join(state_dir, "whisperd.lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            sys.exit(f"whisperd: another whisperd is using {state_dir}; stop it or give "
                     f"--state-dir another folder")
        raise
    return handle


def serve(settings):
    lock = lock_state_dir(settings.state_dir)
    service = Service(settings)
    try:
        server = Server(settings, service)
    except OSError as e:
        sys.exit(f"whisperd: cannot listen on {settings.host}:{settings.port}: {e.strerror}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    host, port = server.server_address[:2]
    log(f"listening on http://{host}:{port} (engine {settings.engine}, state "
        f"{settings.state_dir}, models {settings.model_dir})")
    service.start()
    sd_notify("READY=1")

    ping = watchdog_interval()
    status = None
    while not stop.wait(min(ping or 1.0, 1.0)):
        worker = service.worker
        if ping and worker.is_alive() and (service.engine.loading or
                                           time.monotonic() - worker.beat < 2 * ping):
            sd_notify("WATCHDOG=1")
        running = service.running_job()
        now = (f"{service.counts[QUEUED]} queued; " +
               (f"running {running.id} ({running.progress}%)" if running else "idle"))
        if now != status:
            sd_notify(f"STATUS={now}")
            status = now

    log("stopping: no new jobs; waiting for the running job")
    sd_notify("STOPPING=1")
    with service.lock:
        service.accepting = False
    worker = service.worker
    worker.stopping.set()
    service.queue.put(None)  # wakes an idle worker
    worker.join(settings.shutdown_grace)
    if worker.is_alive():
        log(f"the running job did not finish within {settings.shutdown_grace:g} s; "
            f"interrupting it, it runs again on start")
        worker.abort.set()
        worker.join(10)
    stuck = worker.is_alive()
    if stuck:  # deep in a model load or a decode: leave its job to run again
        with service.lock:
            job = service.running_job()
            if job:
                service.requeue(job)
    server.shutdown()
    server.server_close()
    service.callbacks.stop()
    service.close()
    lock.close()
    log("stopped")
    if stuck:
        # Interpreter exit would tear torch's threads down under the worker and abort;
        # everything is on disk, so leave at once, cleanly.
        sys.stderr.flush()
        os._exit(0)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CLIENT_COMMANDS:
        return client_main(argv)
    return serve(parse_settings(argv))


if __name__ == "__main__":
    sys.exit(main())
