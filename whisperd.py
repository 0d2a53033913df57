#!/usr/bin/env python3
"""whisperd: OpenAI's Whisper behind a small HTTP job API.

A shell script POSTs a job naming an audio file on this host; one runner thread per device
transcribes jobs in the order they came; the transcript lands as files in a folder
(written by openai-whisper's own writers) and a webhook is called when the job ends. Jobs
live in a SQLite database, so a job that was accepted is never lost: not to a crash, a
`kill -9`, a reboot or a `systemctl restart`. Several whisperds on several hosts may share
one queue in a PostgreSQL database instead (--store).

The HTTP API keeps the field names and spellings of the original "Whisper Api" it grew
from (POST /transcription/job, GET and DELETE /transcription/job/:id, /transcription/jobs,
/stats, /smi): existing clients parse them, so they are the wire format. README.md
documents every endpoint and flag, and every decision those left open.

Dependencies: the Python standard library for the server, the queue, the job store and
the callbacks; openai-whisper (and torch) in the runner threads; faster-whisper only with
`--engine faster-whisper` (or `vad`); psycopg only with `--store`. Heavy imports happen in
the runners, after the port answers.

How a job goes: the HTTP handler validates it and the service probes its audio; the job
queue stores it; a runner claims it, transcribes it and hands back an Outcome; the
finisher writes its files and ends it in the queue; the callback sender posts it.

Sections, in reading order, each under a banner (README.md's Layout says what each owns):
settings, errors, jobs, audio, job store, job queue, engines, batches, speakers, output
files, runners, callbacks, systemd, finisher, status, service, http, client, main.
"""

import argparse
import base64
import collections
import contextlib
import copy
import dataclasses
import email.parser
import email.policy
import errno
import fcntl
import functools
import gc
import hashlib
import hmac
import html
import heapq
import http.client
import importlib
import importlib.util
import io
import itertools
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
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.2.0"


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

# The original API's valid values, word for word: they are the wire format.
LANGUAGES = (
    "af,am,ar,as,az,ba,be,bg,bn,bo,br,bs,ca,cs,cy,da,de,el,en,es,et,eu,fa,fi,fo,fr,gl,gu,"
    "ha,haw,he,hi,hr,ht,hu,hy,id,is,it,ja,jw,ka,kk,km,kn,ko,la,lb,ln,lo,lt,lv,mg,mi,mk,ml,"
    "mn,mr,ms,mt,my,ne,nl,nn,no,oc,pa,pl,ps,pt,ro,ru,sa,sd,si,sk,sl,sn,so,sq,sr,su,sv,sw,"
    "ta,te,tg,th,tk,tl,tr,tt,uk,ur,uz,vi,yi,yo,zh"
).split(",")
AUTO_LANGUAGE = "auto"
FORMATS = ("txt", "vtt", "srt", "tsv", "json", "all")
WRITTEN_FORMATS = ("txt", "vtt", "srt", "tsv", "json")  # what "all" writes
# The original API's model names. Every one stays valid; the engines know more.
SEED_MODELS = ("tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en",
               "medium", "large-v1", "large-v2", "large")
TASKS = ("transcribe", "translate")

MAX_BODY = 1 << 20          # bytes of a request body
LINGER = 5.0                # seconds a refused body is still read, for its answer to be read
MAX_WAIT = 60.0             # seconds a GET ?wait= may hold a request
SMI_TIMEOUT = 10.0          # seconds nvidia-smi may take
PROBE_TIMEOUT = 20.0        # seconds ffprobe may take to read a file's header
DECODE_TIMEOUT = 600.0      # seconds the decoding of one file may take (12 h: about 100 s)
MAX_SPEAKERS = 8            # voices a diarized job may name or ask for
MIN_FREE = 1 << 20          # bytes free in --state-dir below which no new job is taken
MODEL_STATES = ["loaded", "on disk", "download"]  # where a model is: /models, /health


def _default_model_dir():
    # Where the `whisper` command keeps its models, so both share one download.
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "whisper")


def _default_state_dir():
    # systemd's StateDirectory= hands us $STATE_DIRECTORY (colon separated if several).
    return (os.environ.get("STATE_DIRECTORY") or "").split(":")[0] or "./var"


def _redact(url):
    """A database URL without its password, for the log."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return parts.geturl()


def _store_problem(url):
    """What is wrong with a --store URL, or None."""
    if not url.startswith(("postgresql://", "postgres://")):
        return (f"must be a postgresql:// URL (or empty, for SQLite in --state-dir), "
                f"got {_redact(url)!r}")
    try:
        urllib.parse.urlsplit(url).port  # a port that is not a number raises
        import psycopg
        psycopg.conninfo.conninfo_to_dict(url)
    except ImportError:
        return "needs psycopg: pip install 'whisperd[postgres]'"
    except ValueError as e:  # psycopg's ProgrammingError is not one: caught below
        return f"is not a URL whisperd can use: {e}"
    except Exception as e:
        return f"is not a URL psycopg can use: {_reason(e)}"
    return None


def log(message):
    """One line per event on stderr; journald adds the timestamp. One write, so that
    lines from several threads never run into each other."""
    sys.stderr.write(f"whisperd: {message}\n")
    sys.stderr.flush()


def utcnow():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reason(error):
    """A short, human reason from an exception (ffmpeg's last line, not its banner)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


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
        elif kwargs.get("action") == "store_true":
            default = value is not None and value.lower() not in ("", "0", "false", "no")
        elif value is not None:
            default = value  # argparse converts string defaults with `type`, checks no choices
            if value not in kwargs.get("choices", [value]):
                parser.error(f"--{name} must be one of {', '.join(kwargs['choices'])} ({env})")
        parser.add_argument("--" + name, default=default, help=f"{help} [{env}]",
                            **({} if "action" in kwargs else {"type": type}), **kwargs)

    flag("host", "127.0.0.1", help="address to listen on (default: loopback only)")
    flag("port", 9000, int, "port to listen on; 0 picks a free one")
    flag("model-dir", _default_model_dir(), help="folder of models: NAME.pt (openai-whisper) "
         "or NAME/ (faster-whisper); missing models are downloaded into it")
    flag("default-model", "large-v2", help="model for jobs that name none")
    flag("device", "auto", help="auto, cpu, cuda or cuda:N, or a comma-separated list for one "
         "worker each (cuda:0,cuda:1; cpu,cpu splits the cores); auto: cuda when a GPU is seen")
    flag("engine", "openai-whisper", help="openai-whisper or faster-whisper")
    flag("compute-type", "auto", help="faster-whisper: int8, float16, float32... "
         "(auto: float16 on GPU, int8 on CPU)")
    flag("batch-size", 0, int, "faster-whisper: >0 decodes the 30 s windows of up to this many "
         "queued jobs together, in one batch")
    flag("pack", False, help="faster-whisper with --batch-size: pack the speech of several "
         "short jobs into one 30 s window", action="store_true")
    flag("batch-timing", "auto", str, "with --batch-size: how a window's text is timed: "
         "'tokens' (the model's timestamp tokens) or 'words' (decoded without them, each "
         "word placed by its alignment); auto: words on a GPU, tokens on a CPU",
         choices=["auto", "tokens", "words"])
    flag("batch-wait", 0.1, float, "with --batch-size: seconds a new batch waits for the next "
         "job while jobs keep coming (a burst's are posted milliseconds apart), 1 s at most")
    flag("max-models", 1, int, "models kept loaded per worker; the least recently used goes "
         "first")
    flag("model-ttl", 0, float, "seconds a model may sit unused before it is unloaded "
         "(0: never)")
    flag("state-dir", _default_state_dir(), help="folder of the job database (and of "
         "uploads, with --store)")
    flag("store", "", help="postgresql://USER@HOST/DB: one queue shared by every whisperd "
         "given the same (default: SQLite in --state-dir)")
    flag("node", "", help="this whisperd's name among the nodes of a --store (default: "
         "HOST:PORT)")
    flag("lease", 30, float, "seconds a node may hold a job without renewing it, before "
         "another node runs it again (--store)")
    flag("history", 10, int, "finished jobs kept")
    flag("max-attempts", 3, int, "times a job is started before a job that keeps "
         "interrupting the daemon is FAILED")
    flag("max-queue", 1000, int, "queued jobs accepted; past it POST answers 503")
    flag("shutdown-grace", 30, float, "seconds SIGTERM waits for the running jobs")
    flag("idle-timeout", 30, float, "seconds a client may sit idle on its connection (or "
         "stall mid-request) before whisperd closes it")
    flag("max-upload", 25, float, "MiB an upload to /v1/audio/* may have")
    flag("max-audio-hours", 12, float, "hours of audio a job may hold: a longer file is "
         "refused at the door, and decoding stops there for one whose header says less")
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
    if not settings.default_model or "/" in settings.default_model:
        parser.error("--default-model must be a model name, like large-v2 or tiny.en")
    settings.devices = [d.strip() for d in settings.device.split(",")]
    for device in settings.devices:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            parser.error(f"--device: {device!r} is not auto, cpu, cuda or cuda:N")
    if settings.idle_timeout <= 0:
        parser.error("--idle-timeout must be more than 0 seconds")
    for name in ("history", "max_queue", "batch_size", "batch_wait", "model_ttl"):
        if getattr(settings, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    for name in ("max_attempts", "max_models", "callback_attempts"):
        if getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if settings.batch_size and settings.engine != "faster-whisper":  # one line, as --store
        sys.exit("whisperd: --batch-size needs --engine faster-whisper (openai-whisper "
                 "decodes one job at a time)")
    if settings.pack and not settings.batch_size:
        sys.exit("whisperd: --pack needs a --batch-size (with --engine faster-whisper)")
    # One line, no usage: the rest of the command line was fine.
    if settings.store and (problem := _store_problem(settings.store)):
        sys.exit(f"whisperd: --store {problem}")
    if settings.lease < 3:
        parser.error("--lease must be at least 3 seconds")
    settings.model_dir = os.path.abspath(os.path.expanduser(settings.model_dir))
    settings.state_dir = os.path.abspath(os.path.expanduser(settings.state_dir))
    settings.allow_dir = [os.path.realpath(d) for d in settings.allow_dir]
    return settings


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

class HTTPError(Exception):
    """An answer other than success; raised anywhere, turned into JSON at the edge."""

    def __init__(self, status, message, field=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.field = HTTPStatus(status), message, field
        self.headers = headers or {}


class Invalid(ValueError):
    """A job field that cannot be accepted; validate() names the field."""

    def __init__(self, message, status=HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class JobFailed(Exception):
    """A job cannot be done, for a reason its owner can act on (the message says it)."""


class AudioError(JobFailed):
    """The job's audio cannot be decoded: the caller's input is at fault."""


class ModelError(JobFailed):
    """The job's model cannot be had (not on disk, no download)."""


class Interrupted(Exception):
    """Raised inside a transcription to stop it; the job goes back to the queue."""


def _fault(point):
    """Raises at `point` when WHISPERD_FAULT names it: how the tests prove that a runner
    outlives an error nobody foresaw (there is no input that makes these points fail)."""
    if os.environ.get("WHISPERD_FAULT") == point:
        raise RuntimeError(f"fault injected at {point} (WHISPERD_FAULT)")


CANCELLED = "cancelled: a client asked to stop it (whisperd cancel, or POST " \
            "/transcription/job/ID/cancel)"


class ShuttingDown(Exception):
    """whisperd is stopping: it takes no new job, and an upload's answer will not come."""


class QueueFull(Exception):
    """--max-queue jobs are waiting already."""


class NotFound(Exception):
    """No such job (never was, deleted, or past --history)."""


class NotQueued(Exception):
    """The job runs or ended: it can no longer be deleted."""


class StoreUnavailable(Exception):
    """The job store cannot take a change now: its disk is full (`full`), or its database
    cannot be reached. Nothing was changed."""

    def __init__(self, message, full=False):
        super().__init__(message)
        self.full = full


class StoreRefused(StoreUnavailable):
    """The database answers, but not to whisperd (no such role or database, a password or
    a privilege missing): at start, whisperd says what to grant and stops."""


# ---------------------------------------------------------------------------------------
# Jobs: every field declared once
# ---------------------------------------------------------------------------------------
#
# A job's fields are the dataclass below, in the order of its JSON. Each field's metadata
# says who sets it (`option`: the client; `state`: whisperd; `view`: computed when shown),
# its JSON schema, a one-line description and, for options, how it reaches the decoder
# or the writers. From these declarations come: validation (validate()), the JSON a client
# sees (Job.to_json), the job store, the OpenAPI schemas and the client's flags.
#
# Adding a job option is ONE edit here: for example
#     no_speech_threshold: float = option(0.6, {"type": "number", "minimum": 0,
#         "maximum": 1}, "probability above which a window counts as silence", decode=True)
# validates it, stores it, shows it, documents it in /openapi.json, gives
# `whisperd submit --no-speech-threshold` and passes it to both engines. Then test it.

QUEUED, RUNNING, COMPLETED, FAILED = "QUEUED", "RUNNING", "COMPLETED", "FAILED"
FINISHED = (COMPLETED, FAILED)


class Callback:
    """A callback's status, one vocabulary from the log to the job to /metrics."""
    NONE = ""               # the job has no callback
    PENDING = "pending"     # not delivered yet; another attempt is due
    DELIVERED = "delivered"
    FAILED = "failed"       # a final answer (4xx but 429), or out of attempts
    SENT = (PENDING, DELIVERED, FAILED)  # after an attempt
    ALL = (NONE, *SENT)


def _field(kind, default, schema, help, **more):
    return dataclasses.field(default=default, metadata={"kind": kind, "schema": schema,
                                                        "help": help, **more})


def option(default, schema, help, parse=None, needs=None, decode=False, writer=False):
    """A field the client may send. `parse(value, job, context)` checks and converts one
    (None when omitted) and raises Invalid; without it the schema is the check. `needs`:
    an option that must be true for this one to be set. `decode`: passed to the engine
    under its name; `writer`: passed to openai-whisper's subtitle writers."""
    return _field("option", default, schema, help, parse=parse, needs=needs, decode=decode,
                  writer=writer)


def state(default, schema, help):
    """A field whisperd sets; stored and shown."""
    return _field("state", default, schema, help)


def view(schema, help):
    """A field computed when the job is shown (never stored)."""
    return _field("view", None, schema, help)


def _nullable(kind, **more):
    return {"type": [kind, "null"], **more}


def _allowed(field, path, verb, context):
    """403 unless --allow-dir is unset or `path` resolves inside one of its folders."""
    if context.allow_dir and not any(os.path.commonpath([os.path.realpath(path), root])
                                     == root for root in context.allow_dir):
        raise Invalid(f"{field} {path!r} is outside the folders whisperd may {verb} "
                      f"(--allow-dir: {', '.join(context.allow_dir)})", HTTPStatus.FORBIDDEN)


def _parse_path(value, job, context):
    if not value:
        raise Invalid("path is required: the absolute path of an audio file on the "
                      "whisperd host")
    if not os.path.isabs(value):
        raise Invalid(f"path must be absolute, got {value!r}")
    _allowed("path", value, "read", context)
    if not os.path.exists(value):
        raise Invalid(f"no such file: {value}")
    if not os.path.isfile(value):
        raise Invalid(f"path is not a regular file: {value}")
    if not os.access(value, os.R_OK):
        raise Invalid(f"whisperd may not read {value}: check its permissions")
    return value


def _parse_output_path(value, job, context):
    given = bool(value)
    folder = os.path.normpath(value or os.path.dirname(job.path))
    if not os.path.isabs(folder):
        raise Invalid(f"output_path must be an absolute folder, got {folder!r}")
    _allowed("output_path", folder, "write", context)
    if not os.path.isdir(folder):
        raise Invalid(f"output_path must be an existing folder: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        hint = "" if given else " (output_path was omitted, so output goes beside the audio)"
        raise Invalid(f"whisperd may not write into {folder}{hint}")
    return folder


def _parse_callback(value, job, context):
    url = urllib.parse.urlsplit(value or "")
    if value and (url.scheme not in ("http", "https") or not url.hostname):
        raise Invalid(f"callback must be an absolute http:// or https:// URL, got {value!r}")
    return value or ""


def _parse_model(value, job, context):
    name = value or context.default_model
    known = context.models()
    if name not in known:
        raise Invalid(f"model {name!r} is not one whisperd can load; valid values: "
                      f"{', '.join(known)} (or NAME{context.model_suffix} in "
                      f"{context.model_dir})")
    return name


def _parse_diarize(value, job, context):
    if value in (None, False, "false"):
        return False
    if value in (True, "true", "channels"):
        if missing := speakers_missing():
            raise Invalid(f"diarize needs whisperd's speakers extra, not installed here: "
                          f"{missing}")
        if value != "channels":
            return True
        try:
            count = channel_count(job.path)
        except Exception:  # not audio: the probe says so, about path
            return value
        if count < 2:
            raise Invalid(f"diarize \"channels\" needs a recording with one speaker per "
                          f"channel; {os.path.basename(job.path)} has {count or 'no'} "
                          f"channel{'s' if count != 1 else ''}: use diarize: true to tell "
                          f"the voices apart")
        return value
    raise Invalid(f"diarize must be true, false or \"channels\", got {value!r}")


def _parse_speakers(value, job, context):
    value = _check_schema(value, _nullable("integer", minimum=1))
    if value is not None and not job.diarize:
        raise Invalid("speakers needs diarize: true")
    if value is not None and job.diarize == "channels":
        raise Invalid("speakers is for diarize: true; with channels, each channel is one")
    if value is not None and value > MAX_SPEAKERS:
        raise Invalid(f"speakers must be at most {MAX_SPEAKERS}")
    return value


def _strings(value, name):
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip()
                                              for v in value):
        raise Invalid(f"{name} must be a list of non-empty strings")
    if not 1 <= len(value) <= MAX_SPEAKERS:
        raise Invalid(f"{name} must hold 1 to {MAX_SPEAKERS} entries")
    return value


def _parse_speaker_names(value, job, context):
    names = _strings(value, "speaker_names")
    if names is None:
        return None
    if not job.diarize:
        raise Invalid("speaker_names needs diarize: true (or \"channels\")")
    if len(set(names)) < len(names):
        raise Invalid("speaker_names must be different from each other")
    if any(re.fullmatch(r"SPEAKER_\d+|[A-Z]", name) for name in names):
        raise Invalid("speaker_names may not look like the labels of unnamed voices "
                      "(SPEAKER_00, A)")
    return [name.strip() for name in names]


def _parse_references(value, job, context):
    """Each a clip of one named voice, checked as a job's path is, and probed: 2 to 30 s."""
    paths = _strings(value, "speaker_references")
    if job.diarize is True and job.speaker_names and paths is None:
        raise Invalid("speaker_names needs speaker_references: a 2-10 s clip of each voice "
                      "(with diarize: true)")
    if paths is None:
        return None
    if job.diarize != True:  # noqa: E712 (True, not "channels")
        raise Invalid("speaker_references needs diarize: true")
    if len(paths) != len(job.speaker_names or ()):
        raise Invalid(f"speaker_references must hold one clip for each of speaker_names "
                      f"({len(job.speaker_names or ())}), got {len(paths)}")
    for path in paths:
        _parse_path(path, job, context)
        seconds = probe(path)
        if seconds is not None and not 1.0 <= seconds <= 30:
            raise Invalid(f"speaker_references {path} holds {seconds:g} s of audio: give "
                          f"2 to 10 s of that voice alone")
    return paths


@dataclasses.dataclass(slots=True, eq=False)
class Job:
    """One transcription job. Its fields, in this order, are its JSON: the original API's
    keys first, in its order; everything after them was added."""

    id: str = state("", {"type": "string"}, "the job's id, a UUID")
    path: str = option(None, {"type": "string"}, "absolute path of an audio file on the "
                       "whisperd host", parse=_parse_path)
    language: str = option(AUTO_LANGUAGE, {"type": "string", "enum": [AUTO_LANGUAGE,
                                                                      *LANGUAGES]},
                           "the spoken language; auto: detected (and shown once known)")
    format: str = option("txt", {"type": "string", "enum": list(FORMATS)},
                         "the file written; all: txt, vtt, srt, tsv and json")
    output_path: str = option("", {"type": "string"}, "an existing folder for the files; "
                              "default: the audio's folder", parse=_parse_output_path)
    progress: int = state(0, {"type": "integer", "minimum": 0, "maximum": 100},
                          "whole percent of the audio decoded; 100 once COMPLETED")
    status: str = state(QUEUED, {"type": "string", "enum": [QUEUED, RUNNING, *FINISHED]},
                        "QUEUED, RUNNING, then COMPLETED or FAILED")
    result: str = state("", {"type": "string"}, "the transcript as TXT once COMPLETED")
    callback: str = option("", {"type": "string", "pattern": "^(https?://[^/].*)?$"},
                           "an http(s) URL POSTed the job when it ends",
                           parse=_parse_callback)
    model: str = option(None, {"type": "string"}, "the Whisper model; default: "
                        "--default-model", parse=_parse_model)
    Duration: float = state(0, {"type": "number"}, "seconds the transcription took; 0 "
                            "until it finished")
    error: str = state("", {"type": "string"}, "why the job FAILED; empty otherwise")
    created_at: str = state("", {"type": "string"}, "ISO 8601 UTC")
    started_at: str | None = state(None, _nullable("string"), "ISO 8601 UTC, or null")
    finished_at: str | None = state(None, _nullable("string"), "ISO 8601 UTC, or null")
    attempts: int = state(0, {"type": "integer"}, "times the job was started")
    audio_duration: float | None = state(None, _nullable("number"), "seconds of audio")
    position: int | None = view(_nullable("integer"), "place in the queue, 1 = next; null "
                                "unless QUEUED")
    eta: float | None = view(_nullable("number"), "seconds until the job is expected to "
                             "finish, from the speed of recent jobs; null until one ran")
    callback_status: str = state(Callback.NONE, {"type": "string", "enum": list(Callback.ALL)},
                                 "pending, delivered or failed; empty without a callback")
    callback_attempts: int = state(0, {"type": "integer"}, "callback deliveries tried")
    worker: str | None = state(None, _nullable("string"), "the worker (device) that ran it")
    node: str | None = state(None, _nullable("string"), "the whisperd (HOST:PORT, or --node) "
                             "that ran it")
    upload: bool = state(False, {"type": "boolean"}, "true for an /v1/audio/* upload, "
                         "whose file whisperd keeps only while the job runs")
    task: str = option("transcribe", {"type": "string", "enum": list(TASKS)},
                       "transcribe, or translate into English", decode=True)
    initial_prompt: str = option("", {"type": "string"}, "text that primes the first "
                                 "window (names, spellings)", decode=True)
    word_timestamps: bool = option(False, {"type": "boolean"}, "word-level timings",
                                   decode=True)
    max_line_width: int | None = option(None, _nullable("integer", minimum=1),
                                        "subtitle line width, in characters",
                                        needs="word_timestamps", writer=True)
    max_line_count: int | None = option(None, _nullable("integer", minimum=1),
                                        "subtitle lines per cue", needs="word_timestamps",
                                        writer=True)
    highlight_words: bool = option(False, {"type": "boolean"}, "underline each word as it "
                                   "is spoken (vtt, srt)", needs="word_timestamps",
                                   writer=True)
    temperature: float = option(0.0, {"type": "number", "minimum": 0, "maximum": 1},
                                "first sampling temperature; the fallback goes on up to 1.0",
                                decode=True)
    vad: bool = option(False, {"type": "boolean"}, "voice activity detection first (Silero "
                       "VAD): silence is never decoded, so no text is invented over it",
                       decode=True)
    condition_on_previous_text: bool = option(True, {"type": "boolean"}, "prompt each window "
                                              "with the text before it; false breaks "
                                              "repetition loops", decode=True)
    hallucination_silence_threshold: float | None = option(
        None, _nullable("number", minimum=0), "seconds of silence skipped where a "
        "hallucination is suspected", needs="word_timestamps", decode=True)
    pack: bool = option(True, {"type": "boolean"}, "with --batch-size: may be decoded in "
                        "a batch with other jobs (and with --pack, share windows); false: "
                        "decoded alone, exactly as the whisper command line decodes it")
    drop_suspect: bool = option(False, {"type": "boolean"}, "leave the segments flagged "
                                "suspect (words likely invented over silence, noise or music) "
                                "out of every file and the result")

    diarize: bool | str = option(False, {"type": ["boolean", "string"], "enum": [
        False, True, "channels"]}, "who said what: true, voices told apart (each segment "
        "gets a speaker); channels: one speaker per channel of the file, each transcribed "
        "on its own", parse=_parse_diarize)
    speakers: int | None = option(None, _nullable("integer", minimum=1, maximum=MAX_SPEAKERS),
                                  "how many voices speak (diarize: true); default: found",
                                  parse=_parse_speakers)
    speaker_names: list | None = option(None, _nullable("array", items={"type": "string"}),
                                        "names for the voices of speaker_references (or, "
                                        "with channels, for the channels in order)",
                                        parse=_parse_speaker_names)
    speaker_references: list | None = option(
        None, _nullable("array", items={"type": "string"}), "host paths of a 2-10 s clip of "
        "each named voice alone, in the order of speaker_names", parse=_parse_references)

    def to_json(self):
        return {name: getattr(self, name) for name in WIRE}

    def stored(self):
        return {name: getattr(self, name) for name in STORED}

    @classmethod
    def from_json(cls, doc):
        # Keys a newer or older whisperd wrote are dropped or defaulted, not fatal.
        return cls(**{name: doc[name] for name in STORED if name in doc})

    def update(self, **changes):
        for name, value in changes.items():  # slots: a misspelt name is an AttributeError
            setattr(self, name, value)


FIELDS = dataclasses.fields(Job)
WIRE = tuple(f.name for f in FIELDS)
STORED = tuple(f.name for f in FIELDS if f.metadata["kind"] != "view")
OPTIONS = tuple(f for f in FIELDS if f.metadata["kind"] == "option")


def _check_schema(value, schema):
    """Checks a value against the small JSON schema of an option; returns it or raises."""
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    if value is None and "null" in kinds:
        return value
    kind = kinds[0]
    if kind == "boolean" and not isinstance(value, bool):
        raise Invalid("must be true or false")
    if kind == "integer" and (type(value) is not int or value < schema.get("minimum", value)):
        raise Invalid(f"must be a whole number of at least {schema.get('minimum', 0)}")
    if kind == "number":
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        if type(value) not in (int, float) or not low <= value <= high:
            raise Invalid(f"must be a number from {low:g} to {high:g}")
        value = float(value)
    if kind == "string":
        if not isinstance(value, str):
            raise Invalid("must be a string")
        if "enum" in schema and value not in schema["enum"]:
            raise Invalid(f"{value!r} is not supported; valid values: "
                          f"{', '.join(schema['enum'])}")
    return value


def validate(body, context):
    """Checks a submitted job body; returns the Job, or raises HTTPError naming the field.

    Everything a job needs is checked here, at submit time, so that a job that got its
    201 fails later only for reasons nobody could see coming. `context` gives what the
    checks need from the daemon: allow_dir, default_model, models(), model_dir.
    """
    if not isinstance(body, dict):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object, like "
                        '{"path": "/abs/audio.mp3", "model": "tiny"}')
    names = [f.name for f in OPTIONS]
    for key in body:
        if key not in names:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"unknown field {key!r}; known fields: "
                                                    f"{', '.join(names)}", key)
    job = Job(id=str(uuid.uuid4()), created_at=utcnow())
    for f in OPTIONS:
        value = body.get(f.name)
        if value == "" and f.default != "":  # "" means omitted, as the original API had it
            value = None
        try:
            if f.metadata["parse"]:
                if value is not None and not isinstance(value, str) and \
                        f.metadata["schema"]["type"] == "string":
                    raise Invalid("must be a string")
                value = f.metadata["parse"](value, job, context)
            elif value is None:
                value = f.default
            else:
                value = _check_schema(value, f.metadata["schema"])
            needs = f.metadata["needs"]
            if value and needs and not getattr(job, needs):
                raise Invalid(f"needs {needs}: true (as in the whisper command line)")
        except Invalid as e:
            message = str(e)
            if message.startswith(("must ", "needs ", "'")):
                message = f"{f.name} {message}"
            raise HTTPError(e.status, message, f.name) from None
        setattr(job, f.name, value)
    if job.model.endswith(".en"):
        if job.language not in ("en", AUTO_LANGUAGE):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"model {job.model} understands English "
                            f"only; use a multilingual model (like {job.model[:-3]}) for "
                            f"language {job.language!r}", "language")
        if job.task == "translate":
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"model {job.model} cannot translate; use "
                                                    f"a multilingual model", "task")
    return job


# ---------------------------------------------------------------------------------------
# Audio at the door
# ---------------------------------------------------------------------------------------

def probe(path):
    """Seconds of audio in `path`, or Invalid with one clear sentence: a file that is not
    audio is refused before its 201. Read by FFmpeg's libavformat, the library of the
    ffmpeg that decodes it later: in this process through PyAV where it is installed (it
    comes with faster-whisper: a millisecond or two a file), else by ffprobe (a process,
    80 ms); the answers are the same, word for word."""
    try:
        import av
    except ImportError:
        return _ffprobe(path)
    name = os.path.basename(path)
    try:  # `timeout` bounds the reads, as ffprobe's PROBE_TIMEOUT does
        with av.open(path, metadata_errors="ignore", timeout=PROBE_TIMEOUT) as container:
            if not container.streams.audio:
                raise _no_audio(name, container.format.name)
            stream = container.streams.audio[0]
            seconds = container.duration / av.time_base if container.duration else \
                stream.duration and float(stream.duration * stream.time_base)
    except av.ExitError:
        raise Invalid(f"ffprobe could not read {name} within {PROBE_TIMEOUT:g} s") from None
    except Invalid:
        raise
    except Exception as e:  # FFmpegError, or anything a strange file makes PyAV raise
        raise _not_audio(name, getattr(e, "strerror", None) or _reason(e)) from None
    return None if seconds is None else round(seconds, 3)


def _not_audio(name, reason):
    plain = reason in ("Invalid argument", "Invalid data found when processing input")
    return Invalid(f"{name} is not audio ffmpeg can decode" + ("" if plain else f" ({reason})"))


def _no_audio(name, kind):
    return Invalid(f"{name} has no audio stream (ffprobe read it as {kind})")


def _ffprobe(path):
    """probe() by the ffprobe command, where PyAV is not installed."""
    name = os.path.basename(path)
    command = ["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries",
               "stream=codec_type,duration:format=duration,format_name", "-of", "json", path]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise JobFailed("ffprobe is not installed: install ffmpeg") from None
    except subprocess.TimeoutExpired:
        raise Invalid(f"ffprobe could not read {name} within {PROBE_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise _not_audio(name, _reason(done.stderr).removeprefix(path + ": "))
    info = json.loads(done.stdout or "{}")
    if not info.get("streams"):
        raise _no_audio(name, info.get("format", {}).get("format_name", "this file"))
    durations = [info.get("format", {}).get("duration")] + \
        [s.get("duration") for s in info["streams"]]
    seconds = next((float(d) for d in durations if d not in (None, "N/A")), None)
    return None if seconds is None else round(seconds, 3)


# ---------------------------------------------------------------------------------------
# Job store: rows in, rows out, claims
# ---------------------------------------------------------------------------------------
#
# Jobs are kept by one of two storages: SQLite in --state-dir (one host) or PostgreSQL
# (--store, one queue for several hosts). Both answer this interface, each method one
# transaction, and neither knows what a job becomes (that is the job queue's, below):
#
#   add(job, max_queued)        a new QUEUED job, unless max_queued are waiting (QueueFull)
#   claim(start)                the next QUEUED job this node may run, changed by
#                               start(job) and now RUNNING here; None if start says no
#   end(ends, keep, segments)   [(job, changes)] ended and counted, each job's segments
#                               now {id: its final segments}; the finished jobs past
#                               the newest `keep` forgotten, but those whose callback is
#                               due; returns the ends recorded (not a run another node
#                               took over)
#   decoded(job, changes, first, segments)   a run's progress (its changes) and its
#                               segments numbered from `first` on (those already there
#                               from `first` on replaced); False if the run is no longer
#                               this node's
#   requeue(undone)             [(job, changes)] of runs here: QUEUED again, in their place
#   delete(job_id)              a QUEUED job removed and returned (NotFound, NotQueued)
#   cancel(job_id, ending, keep)  a QUEUED job ended with ending(job)'s changes, or a
#                               RUNNING one marked to stop, for good (on_stop(id) on the
#                               node that runs it); returns (job, changes, or None if it runs)
#   callback_attempted(job, changes, keep)   a callback's status and attempts
#   keep_up(runs, lost)         this node is alive and renews its runs [(job id, progress)]
#                               (and hears their stops again); each job whose node stopped
#                               renewing gets lost(job, stopped)'s changes; returns (those
#                               [(job, changes)], the jobs whose callbacks are now this node's)
#   adopt()                     at start: pending callbacks to send
#   left_behind()               at start: [(job, stopped)] of this node's runs and uploads
#   get(id), active(), finished(count), upcoming(count), counts(), nodes()
#   segments(id, first, count)  a job's kept segments from number `first` on, at most count
#
# Their errors are their own (StoreUnavailable: nothing changed; QueueFull, NotFound,
# NotQueued); the HTTP section turns them into statuses. A storage locks nothing but its
# pool of connections: no lock is held across a database round trip.

class _SQL:
    """What both storages share: a pool of connections (a thread takes one, uses it alone
    and gives it back), and the statements both databases take alike, written with
    SQLite's `?` (_q() turns them into psycopg's `%s`)."""

    ALL = "-1"  # LIMIT's "no limit" (PostgreSQL: ALL)
    LOCK = ""   # what makes a SELECT hold its rows to the end of the transaction

    def __init__(self):
        self.pool_lock = threading.Lock()
        self.idle = []
        self.closed = False
        self.tokens = {}  # job id -> the token of its run here (PostgreSQL)
        self.on_change = self.on_stop = self.on_decoded = None

    @contextlib.contextmanager
    def _db(self):
        with self.pool_lock:
            conn = self.idle.pop() if self.idle else None
        try:
            conn = conn or self._connect()
            yield conn
        except Exception as e:
            if (problem := self._problem(e)) is None:
                raise
            if conn is not None:
                conn.close()
            raise problem from None
        with self.pool_lock:
            if self.closed or len(self.idle) >= 8 or self._broken(conn):
                conn.close()
            else:
                self.idle.append(conn)

    def _writing(self):
        if self.closed:
            raise StoreUnavailable("the job store is closed")
        return self._db()

    def close(self):
        """Writes nothing more (reads go on, for the answers still on their way); a job
        still running stays as the store last saw it."""
        with self.pool_lock:
            self.closed = True
            while self.idle:
                self.idle.pop().close()

    def _q(self, sql):
        return sql

    def _notify(self, db):
        """Tells the other nodes that the jobs changed (one host: nobody to tell)."""

    def _prune(self, db, keep):
        """The history rule: forget the finished jobs past the newest `keep`, but those
        whose callback is still due."""
        gone = db.execute(f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE "
                          f"finished_at IS NOT NULL ORDER BY finished_at DESC, seq DESC LIMIT "
                          f"{self.ALL} OFFSET {int(keep)}) AND callback_status != 'pending' "
                          f"RETURNING id").fetchall()
        self._drop_segments(db, [job_id for job_id, in gone])

    def _drop_segments(self, db, job_ids, first=0):
        for job_id in job_ids:
            db.execute(self._q("DELETE FROM segments WHERE job_id = ? AND n >= ?"),
                       (job_id, first))

    def _put_segments(self, db, job_id, first, segments):
        """Segments numbered from `first` on, in place of those there from `first` on."""
        self._drop_segments(db, [job_id], first)
        if segments:
            db.cursor().executemany(
                self._q("INSERT INTO segments (job_id, n, doc) VALUES (?, ?, ?)"),
                [(job_id, first + i, self._dump(s)) for i, s in enumerate(segments)])

    def _job(self, doc):
        return Job.from_json(self._load(doc))

    def _doc(self, job, **changes):
        return self._dump(dataclasses.replace(job, **changes).stored())

    def _jobs(self, sql, *args):
        with self._db() as db:
            return [self._job(doc) for doc, in db.execute(self._q(sql), args).fetchall()]

    def delete(self, job_id):
        with self._write() as db:
            row = db.execute(self._q("DELETE FROM jobs WHERE id = ? AND status = 'QUEUED' "
                                     "RETURNING doc"), (job_id,)).fetchone()
            if row:  # a job requeued after a run cut short keeps what that run decoded
                self._drop_segments(db, [job_id])
            status = row or db.execute(self._q("SELECT status FROM jobs WHERE id = ?"),
                                       (job_id,)).fetchone()
            self._notify(db)
        if row:
            return self._job(row[0])
        raise NotQueued(status[0]) if status else NotFound()

    def end(self, ends, keep, segments=None):
        with self._write() as db:
            recorded = [(job, changes) for job, changes in ends
                        if self._end(db, job, changes, self.tokens.get(job.id))]
            for job, _ in recorded:
                if segments and job.id in segments:
                    self._put_segments(db, job.id, 0, segments[job.id])
            self._ended(db, len(recorded), keep)
        self._forget(job for job, _ in ends)  # kept until then: a failed commit is retried
        return recorded

    def _ended(self, db, count, keep):
        db.execute(self._q("UPDATE counters SET value = value + ? WHERE name = 'processed'"),
                   (count,))
        self._prune(db, keep)
        self._notify(db)

    def requeue(self, undone):
        with self._write() as db:
            for job, changes in undone:
                self._queue_again(db, job, changes)
            self._notify(db)
        self._forget(job for job, _ in undone)

    def cancel(self, job_id, ending, keep):
        with self._write() as db:
            row = db.execute(self._q(f"SELECT doc FROM jobs WHERE id = ?{self.LOCK}"),
                             (job_id,)).fetchone()
            job = row and self._job(row[0])
            if job is None:
                raise NotFound()
            if job.status == RUNNING:
                self._stop(db, job.id)
                return job, None
            if job.status != QUEUED:
                raise NotQueued(job.status)
            changes = ending(job)
            self._end(db, job, changes, None)
            self._ended(db, 1, keep)
        return job, changes

    def _forget(self, jobs):
        """The runs of these jobs here are over (PostgreSQL: their tokens go)."""
        for job in jobs:
            self.tokens.pop(job.id, None)

    def _stop(self, db, job_id):
        """Marks the job to stop, for good: a run that dies before it stops ends cancelled
        (see JobQueue._lost), never runs again."""
        db.execute(self._q("UPDATE jobs SET stop = ? WHERE id = ?"), (True, job_id))

    def get(self, job_id):
        found = self._jobs("SELECT doc FROM jobs WHERE id = ?", job_id)
        return found[0] if found else None

    def segments(self, job_id, first=0, count=None):
        with self._db() as db:
            return [self._load(doc) for doc, in db.execute(self._q(
                f"SELECT doc FROM segments WHERE job_id = ? AND n >= ? ORDER BY n LIMIT "
                f"{self.ALL if count is None else int(count)}"), (job_id, first)).fetchall()]

    def active(self):
        return self._jobs("SELECT doc FROM jobs WHERE status IN ('QUEUED', 'RUNNING') "
                          "ORDER BY seq")

    def finished(self, count):
        return self._jobs("SELECT doc FROM jobs WHERE finished_at IS NOT NULL "
                          "ORDER BY finished_at DESC, seq DESC LIMIT ?", count)

    def counts(self):
        with self._db() as db:
            return db.execute(
                "SELECT count(*) FILTER (WHERE status = 'QUEUED'), count(*) FILTER (WHERE "
                "status = 'RUNNING'), (SELECT value FROM counters WHERE name = 'processed') "
                "FROM jobs WHERE status IN ('QUEUED', 'RUNNING')").fetchone()


class SQLiteStore(_SQL):
    """Jobs on one host: a SQLite database (WAL) in --state-dir. A job's arrival, end,
    deletion and requeue are committed with synchronous=FULL (on disk before the caller
    answers), a job's start and a callback's progress with NORMAL (they survive a crash or
    `kill -9`; a power cut may only forget an attempt, never a job). A full disk raises
    StoreUnavailable(full=True) and changes nothing."""

    def __init__(self, state_dir, node):
        super().__init__()
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "whisperd.sqlite3")
        self.node = node
        self.writes, self.counted = 0, (-1, None)  # commits; (commits then, counts)
        with self._db() as db:
            db.executescript("""
                CREATE TABLE IF NOT EXISTS jobs (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order
                    id TEXT NOT NULL UNIQUE,
                    status TEXT NOT NULL,
                    callback_status TEXT NOT NULL DEFAULT '',
                    finished_at TEXT,
                    doc TEXT NOT NULL);
                CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, finished_at);
                CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (seq) WHERE status = 'QUEUED';
                CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY,
                                                     value INTEGER NOT NULL);
                INSERT OR IGNORE INTO counters VALUES ('processed', 0);
                CREATE TABLE IF NOT EXISTS segments (  -- a job's segments, as decoded
                    job_id TEXT NOT NULL,
                    n INTEGER NOT NULL,                -- 0, 1, ... in the job's time order
                    doc TEXT NOT NULL,
                    PRIMARY KEY (job_id, n)) WITHOUT ROWID;
            """)
            if "stop" not in {column[1] for column in db.execute("PRAGMA table_info(jobs)")}:
                db.execute("ALTER TABLE jobs ADD COLUMN stop INTEGER NOT NULL DEFAULT 0")

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _problem(self, error):
        if isinstance(error, sqlite3.Error) and (
                getattr(error, "sqlite_errorname", "") == "SQLITE_FULL" or "full" in str(error)):
            return StoreUnavailable(f"no space left on {os.path.dirname(self.path)}", full=True)
        if isinstance(error, sqlite3.OperationalError):  # locked past the timeout, read-only
            return StoreUnavailable(f"the job database cannot be written ({error})")
        return None

    @staticmethod
    def _broken(db):
        return db.in_transaction

    @contextlib.contextmanager
    def _write(self, durable=True):
        with self._writing() as db:
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            finally:
                self.writes += 1

    _load = staticmethod(json.loads)
    _dump = staticmethod(functools.partial(json.dumps, ensure_ascii=False))

    def _update(self, db, job, changes):
        new = dataclasses.replace(job, **changes)
        db.execute("UPDATE jobs SET status=?, callback_status=?, finished_at=?, doc=? "
                   "WHERE id=?", (new.status, new.callback_status, new.finished_at,
                                  self._dump(new.stored()), new.id))

    _queue_again = _update  # its seq, so its place in the queue, stays

    # -- changes --------------------------------------------------------------------------

    def add(self, job, max_queued):
        with self._write() as db:
            if db.execute("SELECT count(*) FROM jobs WHERE status = 'QUEUED'"
                          ).fetchone()[0] >= max_queued:
                raise QueueFull()
            db.execute("INSERT INTO jobs (id, status, doc) VALUES (?, ?, ?)",
                       (job.id, job.status, self._doc(job)))

    def claim(self, start):
        with self._write(durable=False) as db:
            row = db.execute("SELECT doc FROM jobs WHERE status = 'QUEUED' ORDER BY seq "
                             "LIMIT 1").fetchone()
            job = row and self._job(row[0])
            changes = job and start(job)
            if not changes:
                return None
            self._update(db, job, changes)
        job.update(**changes)
        return job

    def _end(self, db, job, changes, token):
        self._update(db, job, changes)
        return True

    def decoded(self, job, changes, first, segments):
        with self._write(durable=False) as db:
            self._update(db, job, changes)
            self._put_segments(db, job.id, first, segments)
        return True

    def callback_attempted(self, job, changes, keep):
        with self._write(durable=False) as db:
            self._update(db, job, changes)
            self._prune(db, keep)

    def keep_up(self, runs, lost):
        return [], []  # one host: no leases, no other node

    def adopt(self):
        return self._jobs("SELECT doc FROM jobs WHERE callback_status = 'pending' "
                          "ORDER BY finished_at")

    # -- reading --------------------------------------------------------------------------

    def upcoming(self, count):
        return self._jobs("SELECT doc FROM jobs WHERE status = 'QUEUED' ORDER BY seq LIMIT ?",
                          count)

    def left_behind(self):  # every run was this host's, and every upload
        with self._db() as db:
            rows = db.execute("SELECT doc, stop FROM jobs WHERE status IN ('QUEUED', "
                              "'RUNNING') ORDER BY seq").fetchall()
        return [(self._job(doc), bool(stop)) for doc, stop in rows]

    def counts(self):
        """Counted again only after a change: every change on one host is this process's
        (GET /stats, asked by every monitor, costs no query between two changes)."""
        if self.counted[0] != self.writes:
            self.counted = self.writes, super().counts()
        return self.counted[1]

    def nodes(self):
        return []


class PostgresStore(_SQL):
    """Jobs for several hosts: one PostgreSQL database every node reads and writes
    (--store postgresql://...), through psycopg 3.

    A node claims the next job with SELECT ... FOR UPDATE SKIP LOCKED (no job runs twice)
    and holds it on a lease that it renews while it runs (keep_up); a node that dies lets
    its leases lapse, and any other node changes those jobs as the queue's rule says. Each
    run carries a token, so a node that lost its lease cannot record the end of a job
    another node took over. Callbacks are leased the same way. LISTEN/NOTIFY calls
    on_change() on every node. Connections are made again by themselves.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS jobs (
            seq bigserial UNIQUE NOT NULL,     -- queue order, kept when a job is requeued
            id text PRIMARY KEY,
            status text NOT NULL,
            node text,                         -- the node a RUNNING job runs on
            token uuid,                        -- that run's: ends and renewals must match
            lease_until timestamptz,           -- the database's clock, never a node's
            origin text,                       -- the node that took an upload
            upload boolean NOT NULL DEFAULT false,
            callback_status text NOT NULL DEFAULT '',
            callback_node text,
            callback_lease_until timestamptz,
            finished_at timestamptz,
            doc jsonb NOT NULL);
        ALTER TABLE jobs ADD COLUMN IF NOT EXISTS stop boolean NOT NULL DEFAULT false;
        CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (seq) WHERE status = 'QUEUED';
        CREATE INDEX IF NOT EXISTS jobs_running ON jobs (lease_until) WHERE status = 'RUNNING';
        CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
        CREATE TABLE IF NOT EXISTS counters (name text PRIMARY KEY, value bigint NOT NULL);
        INSERT INTO counters VALUES ('processed', 0) ON CONFLICT DO NOTHING;
        CREATE TABLE IF NOT EXISTS nodes (name text PRIMARY KEY, url text,
                                          last_seen timestamptz NOT NULL);
        CREATE TABLE IF NOT EXISTS segments (job_id text NOT NULL, n integer NOT NULL,
                                             doc jsonb NOT NULL, PRIMARY KEY (job_id, n));
    """
    CLAIMABLE = "status = 'QUEUED' AND (NOT upload OR origin = %s)"  # uploads stay home
    ALL, LOCK = "ALL", " FOR UPDATE"

    def __init__(self, url, node, address, lease):
        super().__init__()
        import psycopg
        from psycopg.types.json import Jsonb
        self.psycopg, self._dump = psycopg, Jsonb
        self.url, self.node, self.address, self.lease = url, node, address, lease
        self.ready = False         # schema made
        threading.Thread(target=self._listen, name="listen", daemon=True).start()

    def _connect(self):
        conn = self.psycopg.connect(self.url, autocommit=True, connect_timeout=3,
                                    application_name=f"whisperd {self.node}")
        if not self.ready:
            try:
                with conn.transaction():  # nodes starting together must not race on it
                    conn.execute("SELECT pg_advisory_xact_lock(2004318071)")
                    conn.execute(self.SCHEMA)
            except self.psycopg.Error as e:
                conn.close()
                raise StoreRefused(self._advice(str(e).splitlines()[0])) from None
            self.ready = True
        return conn

    REFUSALS = ("does not exist", "authentication failed", "no pg_hba.conf entry",
                "permission denied")

    def _advice(self, reason):
        """What a refusal means, and the SQL (or the setting) that ends it."""
        info = self.psycopg.conninfo.conninfo_to_dict(self.url)
        user = info.get("user") or os.environ.get("PGUSER") or os.environ.get("USER", "?")
        db = info.get("dbname") or user
        hint = (f"as PostgreSQL's superuser: ALTER DATABASE {db} OWNER TO {user}; (or, in "
                f"{db}: GRANT CREATE, USAGE ON SCHEMA public TO {user};)"
                if "permission denied" in reason else
                f"as PostgreSQL's superuser: CREATE DATABASE {db} OWNER {user};"
                if reason.startswith("database") else
                f"as PostgreSQL's superuser: CREATE ROLE {user} LOGIN PASSWORD '...';"
                if reason.startswith("role") else "check the user and password in --store, "
                "and pg_hba.conf on the database's host")
        return f"the database refuses whisperd ({reason}); {hint}"

    def _problem(self, error):
        if isinstance(error, self.psycopg.OperationalError):
            reason = (str(error).partition("FATAL:")[2].strip().splitlines() or
                      [_reason(error)])[0]
            if any(refusal in reason for refusal in self.REFUSALS):
                return StoreRefused(self._advice(reason))
            return StoreUnavailable(f"the database cannot be reached ({_reason(error)})")
        return None

    @staticmethod
    def _broken(conn):
        return conn.closed or conn.broken

    @contextlib.contextmanager
    def _write(self):
        with self._writing() as conn, conn.transaction():
            yield conn

    def _listen(self):
        """Hears every node's changes (NOTIFY whisperd) and tells on_change()."""
        delay = 0.1
        while not self.closed:
            try:
                with self.psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                    conn.execute("LISTEN whisperd")
                    delay = 0.1
                    changed = True  # after a reconnection: what was said meanwhile is lost
                    while not self.closed:
                        if changed and self.on_change:
                            self.on_change()
                        changed = False
                        for said in conn.notifies(timeout=1.0, stop_after=1):
                            kind, _, job_id = said.payload.partition(" ")
                            if kind == "stop" and self.on_stop:
                                self.on_stop(job_id)
                            elif kind == "decoded" and self.on_decoded:
                                self.on_decoded(job_id)
                            else:
                                changed = True
            except self.psycopg.OperationalError:
                with self.pool_lock:  # the idle connections went down with this one
                    while self.idle:
                        self.idle.pop().close()
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    _load = staticmethod(lambda doc: doc)  # jsonb arrives as a dict

    def _q(self, sql):
        return sql.replace("?", "%s")

    def _notify(self, conn):
        conn.execute("NOTIFY whisperd")

    # -- changes --------------------------------------------------------------------------

    def add(self, job, max_queued):
        with self._write() as conn:
            if conn.execute(
                    "INSERT INTO jobs (id, status, origin, upload, doc) SELECT %s, 'QUEUED', "
                    "%s, %s, %s WHERE (SELECT count(*) FROM jobs WHERE status = 'QUEUED') < %s "
                    "RETURNING seq", (job.id, self.node, job.upload, self._doc(job), max_queued)
                    ).fetchone() is None:
                raise QueueFull()
            self._notify(conn)

    def claim(self, start):
        with self._write() as conn:
            row = conn.execute(f"SELECT doc FROM jobs WHERE {self.CLAIMABLE} ORDER BY seq "
                               f"LIMIT 1 FOR UPDATE SKIP LOCKED", (self.node,)).fetchone()
            job = row and Job.from_json(row[0])
            changes = job and start(job)
            if not changes:
                return None
            token = uuid.uuid4()
            conn.execute("UPDATE jobs SET status = 'RUNNING', node = %s, token = %s, "
                         "lease_until = now() + %s * interval '1 second', doc = %s "
                         "WHERE id = %s", (self.node, token, self.lease,
                                           self._doc(job, **changes), job.id))
            self._notify(conn)
        job.update(**changes)
        self.tokens[job.id] = token
        return job

    def _stop(self, conn, job_id):
        super()._stop(conn, job_id)
        conn.execute("SELECT pg_notify('whisperd', %s)", (f"stop {job_id}",))

    def _end(self, conn, job, changes, token):
        """One job's end, if `token` still holds its run; True when recorded."""
        pending = changes.get("callback_status") == Callback.PENDING
        return conn.execute(
            "UPDATE jobs SET status = %s, finished_at = now(), lease_until = NULL, token = NULL, "
            "node = NULL, callback_status = %s, callback_node = CASE WHEN %s THEN %s END, "
            "callback_lease_until = CASE WHEN %s THEN now() + %s * interval '1 second' END, "
            "doc = %s WHERE id = %s AND status IN ('QUEUED', 'RUNNING') AND token IS NOT "
            "DISTINCT FROM %s", (changes["status"], changes["callback_status"], pending,
                                 self.node, pending, self.lease, self._doc(job, **changes),
                                 job.id, token)).rowcount == 1

    def decoded(self, job, changes, first, segments):
        with self._write() as conn:
            if conn.execute("UPDATE jobs SET doc = %s WHERE id = %s AND token = %s",
                            (self._doc(job, **changes), job.id, self.tokens.get(job.id))
                            ).rowcount != 1:
                return False  # its lease lapsed: another node runs it now
            self._put_segments(conn, job.id, first, segments)
            conn.execute("SELECT pg_notify('whisperd', %s)", (f"decoded {job.id}",))
        return True

    def _queue_again(self, conn, job, changes):
        """A RUNNING job QUEUED again, in its place in the queue (its seq stays)."""
        conn.execute("UPDATE jobs SET status = 'QUEUED', node = NULL, token = NULL, "
                     "lease_until = NULL, doc = %s WHERE id = %s",
                     (self._doc(job, **changes), job.id))

    def callback_attempted(self, job, changes, keep):
        with self._write() as conn:
            conn.execute("UPDATE jobs SET callback_status = %s, callback_lease_until = CASE "
                         "WHEN %s THEN now() + %s * interval '1 second' END, doc = %s "
                         "WHERE id = %s", (changes["callback_status"],
                                           changes["callback_status"] == Callback.PENDING,
                                           self.lease, self._doc(job, **changes), job.id))
            self._prune(conn, keep)

    def keep_up(self, runs, lost):
        with self._write() as conn:
            conn.execute("INSERT INTO nodes VALUES (%s, %s, now()) ON CONFLICT (name) DO "
                         "UPDATE SET url = excluded.url, last_seen = now()",
                         (self.node, self.address))
            for job_id, progress in runs:
                renewed = conn.execute(
                    "UPDATE jobs SET lease_until = now() + %s * interval '1 second', doc = "
                    "jsonb_set(doc, '{progress}', to_jsonb(%s::int)) WHERE id = %s AND "
                    "token = %s RETURNING stop", (self.lease, progress, job_id,
                                                  self.tokens.get(job_id))).fetchone()
                if renewed and renewed[0]:  # a stop whose notice was missed
                    self.on_stop(job_id)
            conn.execute("UPDATE jobs SET callback_lease_until = now() + %s * interval "
                         "'1 second' WHERE callback_status = 'pending' AND callback_node = %s",
                         (self.lease, self.node))
            changed, due = [], []
            for doc, token, stop in conn.execute(
                    "SELECT doc, token, stop FROM jobs WHERE status = 'RUNNING' AND "
                    "lease_until < now() ORDER BY seq FOR UPDATE SKIP LOCKED").fetchall():
                job = Job.from_json(doc)
                changes = lost(job, stop)
                if changes["status"] == QUEUED:
                    self._queue_again(conn, job, changes)
                elif self._end(conn, job, changes, token):
                    conn.execute("UPDATE counters SET value = value + 1 "
                                 "WHERE name = 'processed'")
                    if job.callback:
                        due.append(dataclasses.replace(job, **changes))
                changed.append((job, changes))
            if changed:
                self._notify(conn)
            due += self._adopt(conn, orphans_only=True)
        return changed, due

    def _adopt(self, conn, orphans_only):
        """Takes the pending callbacks of nodes that stopped (and, at start, this node's
        own from before)."""
        rows = conn.execute(
            "UPDATE jobs SET callback_node = %s, callback_lease_until = now() + %s * interval "
            "'1 second' WHERE callback_status = 'pending' AND (callback_node IS NULL OR "
            "callback_lease_until < now()" + ("" if orphans_only else " OR callback_node = %s")
            + ") RETURNING doc", (self.node, self.lease) + (() if orphans_only else (self.node,))
        ).fetchall()
        return [Job.from_json(doc) for doc, in rows]

    def adopt(self):
        with self._write() as conn:
            return self._adopt(conn, orphans_only=False)

    # -- reading --------------------------------------------------------------------------

    def upcoming(self, count):
        return self._jobs(f"SELECT doc FROM jobs WHERE {self.CLAIMABLE} ORDER BY seq "
                          f"LIMIT %s", self.node, count)

    def left_behind(self):
        """What this node left when it stopped: its runs (whose tokens it takes back),
        and its uploads."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT doc, token, stop FROM jobs WHERE (status = 'RUNNING' AND node = %s) "
                "OR (upload AND origin = %s AND status IN ('QUEUED', 'RUNNING')) ORDER BY seq",
                (self.node, self.node)).fetchall()
        self.tokens.update((doc["id"], token) for doc, token, _ in rows)
        return [(Job.from_json(doc), stop) for doc, _, stop in rows]

    def nodes(self):
        """The nodes seen within a lease: [{"name", "url", "last_seen"}]."""
        with self._db() as conn:
            rows = conn.execute("SELECT name, url, last_seen FROM nodes WHERE last_seen > "
                                "now() - %s * interval '1 second' ORDER BY name",
                                (self.lease,)).fetchall()
        return [{"name": name, "url": url, "last_seen": seen.isoformat(timespec="seconds")}
                for name, url, seen in rows]


# ---------------------------------------------------------------------------------------
# Job queue: every change of a job's state, and the rules, once
# ---------------------------------------------------------------------------------------

def _undone(job, count_attempt=True):
    """What a run that ended without an end changes: the job is QUEUED again; a run that
    was not the job's fault (a shutdown) does not count as an attempt."""
    return dict(status=QUEUED, progress=0, started_at=None, worker=None, node=None,
                attempts=job.attempts - (not count_attempt))


def _position(since):
    """(segments sent, status, progress) from a stream's last event id, as events() makes
    them; (0, None, -1) for none, or one it did not make."""
    try:
        sent, status, progress = since.split(":")
        return int(sent), status, int(progress)
    except (AttributeError, ValueError):
        return 0, None, -1


def _event_segment(segment, number):
    """A stored segment as a stream shows it: its number in the job, its times and text
    (and words, and its flags once judged), without the decoder's tokens."""
    return {"id": number, **{k: v for k, v in segment.items()
                             if k not in ("id", "seek", "tokens")}}


# What a runner hands back for a job: whisper's result, the JobFailed that ended it, or None
# (interrupted by a shutdown); its seconds, and the runner's busy seconds.
Outcome = collections.namedtuple("Outcome", "job result seconds busy", defaults=(0.0, 0.0))


class JobQueue:
    """The one owner of every change of a job's state: added, claimed, progressed, ended,
    requeued, lost (its whisperd died under it), deleted, and its callback's status, each
    through one method that stores it, logs it and tells the waiters; and of the rules,
    once for both storages: a start, a lost run, the history, position and eta. Its lock
    guards only its memory (this node's runs, speeds, tallies), never a storage call."""

    SPEED_WINDOW = 20  # recent jobs whose speed gives the eta

    def __init__(self, storage, settings):
        self.storage, self.settings = storage, settings
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.version = 0                 # counts changes, so a waiter misses none
        self.runs = {}                   # id -> the Job running here, with its progress
        self.claiming = set()            # ids claimed here, their runs not in `runs` yet
        self.stepped = {}                # id -> when that run's progress last moved
        self.speeds = collections.deque(maxlen=self.SPEED_WINDOW)  # (audio s, busy s)
        self.counters = collections.Counter()
        self.trouble = None
        self.stops = {}                  # id -> when its run was asked to stop (cancelled)
        self.written = {}                # id -> its segments stored (a run here)
        self.decoded = {}                # id -> its segments as its runner last reported
        self.news = collections.Counter()  # id -> its progress and segments seen changing
        self.followed = collections.Counter()  # id -> event streams open on it here
        storage.on_change, storage.on_stop, storage.on_decoded = self.wake, self._stop, self._heard

    def wake(self):
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    def wait_for_change(self, seen, seconds):
        """Holds until a change after version `seen` (read before looking), at most
        `seconds`."""
        with self.changed:
            return self.changed.wait_for(lambda: self.version != seen, seconds)

    def troubled(self, message):
        """Says once what keeps the storage from taking changes; None says it is over."""
        if message != self.trouble:
            log(message or "the job store takes changes again")
            self.trouble = message

    # -- changes --------------------------------------------------------------------------

    def add(self, job):
        """Stores a new QUEUED job; returns its JSON as created (QUEUED, in its place),
        even when a runner took it in the same instant."""
        self.storage.add(job, self.settings.max_queue)
        log(f"job {job.id} queued: {job.path} -> {job.output_path} (model {job.model}, "
            f"format {job.format})")
        self.wake()
        active = [job if other.id == job.id else other for other in self.storage.active()]
        return next(doc for doc in self._shown(active + [job] * (job not in active))
                    if doc["id"] == job.id)

    def claim(self, worker, accept=lambda job: True):
        """The next queued job, now RUNNING on `worker`; None when none is queued, or when
        `accept` does not take it (jobs start in the order they came)."""
        tried = []

        def start(job):  # inside the claim's transaction: held here before it commits
            if not accept(job):
                return None
            with self.lock:
                self.claiming.add(job.id)
            tried.append(job.id)
            return dict(status=RUNNING, attempts=job.attempts + 1, started_at=utcnow(),
                        progress=0, worker=worker, node=self.storage.node)

        try:
            job = self.storage.claim(start)
        except BaseException:
            with self.lock:
                self.claiming.difference_update(tried)
            raise
        if job is None:
            return None
        try:  # what a run cut short kept: this run resumes after it
            kept = self.storage.segments(job.id)
        except StoreUnavailable:
            kept = []  # decoded again from the start, and written over
        with self.lock:
            self.runs[job.id], self.stepped[job.id] = job, time.monotonic()
            self.written[job.id], self.decoded[job.id] = len(kept), kept
            self.claiming.discard(job.id)
        log(f"job {job.id} running on {worker} (attempt {job.attempts}" + (
            f"; {kept[-1]['end']:.1f} s of its audio were decoded before)" if kept else ")"))
        self.wake()
        return job

    def resume(self, job):
        """The segments an earlier run of this claimed job kept (read at the claim; its
        runner asks before it reports any)."""
        with self.lock:
            return self.decoded.get(job.id, [])

    def progress(self, job, fraction=None, segments=None, **seen):
        """How far a run here is, what was learnt of its audio, and `segments`: the
        job's segments so far (those a run before kept, then this run's), in the file's
        times. What changed in them is stored with the progress it came with, in one
        commit (a run cut short resumes from them); progress alone is kept in memory
        (and renewed to the other nodes with the lease)."""
        changes = dict(seen)
        if fraction is not None:
            changes["progress"] = min(99, int(fraction * 100))  # 100 is for COMPLETED
        with self.lock:
            if job.id not in self.runs:  # handed back meanwhile (a runner stuck at stop)
                return
            moved = changes.get("progress", job.progress) != job.progress
            if moved:
                self.stepped[job.id] = time.monotonic()
            job.update(**changes)
            stored = self.written[job.id]
            if segments is not None:
                self.decoded[job.id] = segments
        first = stored if segments is None else min(stored, len(segments))
        stores = segments is not None and (first < stored or len(segments) > stored)
        if stores:  # new ones, or fewer than stored: some are decoded again
            try:
                stores = self.storage.decoded(job, changes, first, segments[first:])
            except StoreUnavailable as e:  # stored at the next step
                self.troubled(f"the segments of job {job.id} wait to be stored: {e}")
                stores = False
            else:
                self.troubled(None)
        if moved or stores:
            with self.changed:
                if stores and job.id in self.written:
                    self.written[job.id] = len(segments)
                self.news[job.id] += 1
                self.changed.notify_all()

    def _heard(self, job_id):
        """Another node stored segments of a job it runs."""
        with self.changed:
            if self.followed[job_id]:
                self.news[job_id] += 1
                self.changed.notify_all()

    def _ending(self, job, outcome, seconds=0.0):
        """What a job's end changes: whisper's result, or the JobFailed that ended it."""
        changes = {"Duration": seconds, "finished_at": utcnow(),
                   "callback_status": Callback.PENDING if job.callback else Callback.NONE}
        if isinstance(outcome, dict):
            return dict(changes, status=COMPLETED, result=transcript(outcome), progress=100,
                        language=outcome.get("language") or job.language)
        return dict(changes, status=FAILED, error=str(outcome))

    def end(self, outcomes):
        """Ends jobs in one commit: [Outcome]; returns those recorded (a run another node
        took over is not). Raises StoreUnavailable, changing nothing."""
        ends = [(o.job, self._ending(o.job, o.result, o.seconds)) for o in outcomes]
        segments = {o.job.id: o.result["segments"] for o in outcomes
                    if isinstance(o.result, dict)}
        recorded = {job.id for job, _ in self.storage.end(ends, self.settings.history,
                                                          segments)}
        with self.lock:
            for (job, changes), o in zip(ends, outcomes):
                self._gone(job.id)
                if job.id not in recorded:
                    continue
                job.update(**changes)
                self._count(job.status, job.worker)
                self.counters[("busy", job.worker)] += o.busy
                if job.status == COMPLETED:
                    self.counters[("audio", job.worker)] += job.audio_duration or 0
                    self.speeds.append((job.audio_duration or 0, o.busy))
        for job, _ in ends:
            log(f"job {job.id} ended here after another node took it over: this run is not "
                f"recorded" if job.id not in recorded else
                f"job {job.id} completed in {job.Duration} s" if job.status == COMPLETED else
                f"job {job.id} failed: {job.error}")
        self.wake()
        return [o for o in outcomes if o.job.id in recorded]

    def requeue(self, jobs, count_attempt=True):
        """Runs here back to the queue, in their places; a run a client cancelled is left
        as it is, for the next start (or the node taking its lease) to end cancelled."""
        with self.lock:
            jobs = [job for job in jobs if job.id not in self.stops]
        undone = [(job, _undone(job, count_attempt)) for job in jobs]
        self.storage.requeue(undone)
        with self.lock:
            for job, changes in undone:
                self._gone(job.id)
                job.update(**changes)
        self.wake()

    def _gone(self, job_id):
        """Forgets a run here (under the lock)."""
        for runs in (self.runs, self.stepped, self.stops, self.written, self.decoded,
                     self.news):
            runs.pop(job_id, None)

    def _lost(self, job, stopped=False):
        """What a job becomes when the whisperd running it died (a crash, `kill -9`, power
        loss; with --store, a lease that lapsed): it runs again, counted as an attempt, up
        to --max-attempts starts; an upload fails, for its client was disconnected; a job
        a client cancelled (`stopped`) ends cancelled."""
        limit = self.settings.max_attempts
        if stopped:
            return self._ending(job, JobFailed(CANCELLED))
        if job.upload:
            return self._ending(job, JobFailed("whisperd restarted while this upload was "
                                               "waiting; its client was disconnected"))
        if job.attempts >= limit:
            return self._ending(job, JobFailed(
                f"the whisperd running this job stopped {job.attempts} times (crash, kill or "
                f"power loss); giving up after --max-attempts={limit}"))
        return _undone(job)

    def _said(self, lost, why):
        for job, changes in lost:
            log(f"job {job.id} failed: {changes['error']}" if changes["status"] == FAILED else
                f"job {job.id} requeued: {why} (attempt {job.attempts} of "
                f"{self.settings.max_attempts})")

    def recover(self):
        """At start: what this whisperd left behind when it died. Queued jobs stay queued;
        runs and uploads are lost (_lost). Returns the callbacks to send."""
        lost = [(job, self._lost(job, stopped)) for job, stopped in self.storage.left_behind()
                if job.status == RUNNING or job.upload]
        ended = [(job, c) for job, c in lost if c["status"] != QUEUED]
        if ended:
            self._counted(self.storage.end(ended, self.settings.history))
        self.storage.requeue([(job, c) for job, c in lost if c["status"] == QUEUED])
        self._said(lost, "whisperd stopped while running it")
        self.wake()
        return self.storage.adopt()

    def keep_up(self):
        """Every third of a lease (--store): renews this node's runs, applies _lost to the
        jobs of nodes that stopped renewing theirs; returns the callbacks now this node's."""
        with self.lock:
            runs = [(job.id, job.progress) for job in self.runs.values()]
            now = time.monotonic()  # the stops of runs elsewhere (or already over) go
            self.stops = {i: t for i, t in self.stops.items() if i in self.runs or now - t < 60}
        lost, due = self.storage.keep_up(runs, self._lost)
        self._said(lost, "the node running it stopped renewing its lease")
        self._counted([(job, c) for job, c in lost if c["status"] != QUEUED])
        return due

    def _count(self, status, worker):
        """An end recorded here, by status and the worker that ran the job ("" for none:
        a queued job cancelled). Under the lock."""
        self.counters[("jobs", status, worker or "")] += 1

    def _counted(self, ended):
        """Counts ends recorded outside a run: [(job, its changes)]."""
        with self.lock:
            for job, changes in ended:
                self._count(changes["status"], job.worker)

    def delete(self, job_id):
        """Removes a QUEUED job; returns it."""
        try:
            job = self.storage.delete(job_id)
        except NotFound:
            raise self._missing(job_id) from None
        except NotQueued as e:
            raise NotQueued(f"job {job_id} is {e}; only QUEUED jobs can be deleted (stop a "
                            f"RUNNING one with POST /transcription/job/{job_id}/cancel)") from None
        log(f"job {job_id} deleted")
        self.wake()
        return job

    def cancel(self, job_id):
        """Cancels a job: a QUEUED one ends FAILED now; a RUNNING one, here or on another
        node, is stopped by its runner at its next step and ends FAILED then. Returns the
        job, and whether it ended now."""
        try:
            job, changes = self.storage.cancel(job_id, lambda job: self._ending(
                job, JobFailed(CANCELLED)), self.settings.history)
        except NotFound:
            raise self._missing(job_id) from None
        except NotQueued as e:
            raise NotQueued(f"job {job_id} is {e} already; only a QUEUED or RUNNING job can "
                            f"be cancelled") from None
        if changes is None:
            self._stop(job_id)
            log(f"job {job_id} cancelled: its runner stops it at its next step")
        else:
            job.update(**changes)
            self._counted([(job, changes)])
            log(f"job {job_id} failed: {job.error}")
        self.wake()
        return job, changes is not None

    def _stop(self, job_id):
        """Marks a run to stop: its runner asks cancelled() at each step. Marked even
        before this node's claim of it is known here; keep_up() drops the others."""
        with self.lock:
            self.stops[job_id] = time.monotonic()

    def cancelled(self, job_id):
        return job_id in self.stops

    def callback_attempted(self, job, status, attempts, detail):
        changes = dict(callback_status=status, callback_attempts=attempts)
        try:
            self.storage.callback_attempted(job, changes, self.settings.history)
        except StoreUnavailable as e:
            log(f"job {job.id} callback {status}, not recorded ({e})")
        with self.lock:
            job.update(**changes)
            self.counters[("callbacks", status)] += 1
        log(f"job {job.id} callback {status} ({detail}) after attempt {attempts} to "
            f"{job.callback}")

    # -- reading --------------------------------------------------------------------------

    def _missing(self, job_id):
        return NotFound(f"no job {job_id}: it never existed, was deleted, or finished more "
                        f"than {self.settings.history} jobs ago")

    def speed(self):
        """Seconds of audio transcribed per second of decoding, over recent jobs."""
        with self.lock:
            audio, busy = map(sum, zip(*self.speeds)) if self.speeds else (0, 0)
        return round(audio / busy, 2) if busy else None

    def _shown(self, jobs):
        """The JSON of jobs given in queue order: a run here as it is now, a queued job's
        position, and an eta for each unfinished one (from recent speed: the running jobs'
        audio left, then the audio queued ahead, shared by the workers). A run's eta counts
        down between its progress steps, at that speed."""
        speed, workers, now = self.speed() or 0, len(self.settings.devices), time.monotonic()
        with self.lock:
            jobs = [self.runs.get(job.id, job) if job.status == RUNNING else job
                    for job in jobs]
            docs = [job.to_json() for job in jobs]
            left = {job.id: max(0.0, (job.audio_duration or 0) * (100 - job.progress) / 100
                                - speed * (now - self.stepped.get(job.id, now)))
                    for job in jobs if job.status == RUNNING}  # seconds of audio left
        ahead, position = sum(left.values()), 0
        for job, doc in zip(jobs, docs):
            if job.status == QUEUED:
                position += 1
                ahead += job.audio_duration or 0
                doc["position"] = position
            if job.status in (QUEUED, RUNNING) and speed:
                doc["eta"] = round(ahead / (speed * workers) if job.status == QUEUED
                                   else left[job.id] / speed, 1)
        return docs

    def show(self, job_id):
        job = self.storage.get(job_id)
        if job is None:
            raise self._missing(job_id)
        if job.status != QUEUED:
            return self._shown([job])[0]
        found = [doc for doc in self._shown(self.storage.active()) if doc["id"] == job_id]
        return found[0] if found else self.show(job_id)  # it ended meanwhile

    def listing(self):
        """Queued and running jobs and the last --history finished ones, oldest first."""
        docs = self._shown(self.storage.active()) + self._shown(
            self.storage.finished(self.settings.history))
        return sorted(docs, key=lambda doc: doc["created_at"])

    KEEPALIVE = 15.0  # seconds of nothing new after which a stream hears that it lives

    def events(self, job_id, since=""):
        """A job's events, as they happen, for a stream: (kind, its JSON, its id) where
        kind is "status" (each change of status), "segment" (each as soon as it is
        stored: a run's as it decodes, a finished job's from the first), "progress" (as
        it rises) and last "end" (the job as GET shows it); None after KEEPALIVE seconds
        of nothing. Each id is where the stream stands ("segments sent:status:progress",
        and "end"): given back as `since`, what came up to it is not sent again. NotFound
        if there is no such job. Holds one page of segments at a time, and no lock between
        events. A run here is read from memory (its job, and its segments as the runner
        reported them): a hundred streams of it cost the store nothing."""
        sent, status, progress = _position(since)
        with self.lock:
            self.followed[job_id] += 1
        try:
            while True:
                with self.lock:
                    seen = self.version, self.news[job_id]
                    job, decoded = self.runs.get(job_id), self.decoded.get(job_id)
                    now = job and (job.status, job.progress, job.attempts)
                if job is None:  # not running here: as stored
                    job = self.storage.get(job_id)
                    if job is None:
                        if status is None:
                            raise self._missing(job_id)
                        return  # deleted meanwhile
                    now = job.status, job.progress, job.attempts
                if now[0] != status:
                    status = now[0]
                    yield "status", {"id": job_id, "status": status, "attempts": now[2]}, \
                        f"{sent}:{status}:{progress}"
                while page := (self.storage.segments(job_id, sent, self.PAGE)
                               if decoded is None else decoded[sent:sent + self.PAGE]):
                    for segment in page:
                        sent += 1
                        yield "segment", _event_segment(segment, sent - 1), \
                            f"{sent}:{status}:{progress}"
                    if len(page) < self.PAGE:
                        break
                if now[1] != progress:
                    progress = now[1]
                    yield "progress", {"progress": progress}, f"{sent}:{status}:{progress}"
                if status in FINISHED:
                    yield "end", self.show(job_id), "end"
                    return
                with self.changed:
                    if not self.changed.wait_for(lambda: (self.version, self.news[job_id])
                                                 != seen, self.KEEPALIVE):
                        yield None
        finally:
            with self.lock:
                self.followed[job_id] -= 1
                if not self.followed[job_id]:
                    del self.followed[job_id]
                    if job_id not in self.runs:
                        self.news.pop(job_id, None)

    PAGE = 100  # segments read at a time

    def wait(self, job_id, seconds):
        """Holds until the job has finished, at most `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            seen = self.version
            job = self.storage.get(job_id)
            if job is None:
                raise self._missing(job_id)
            left = deadline - time.monotonic()
            if job.status in FINISHED or left <= 0:
                return
            self.wait_for_change(seen, min(left, 5.0))

    def stats(self):
        return dict(zip(("Queued", "Running", "Processed"), self.storage.counts()))

    def upcoming(self, count):
        return self.storage.upcoming(count)

    def streams(self):
        """Event streams open here."""
        with self.lock:
            return sum(self.followed.values())

    def running_here(self):
        with self.lock:
            return list(self.runs.values())

    def held_here(self):
        """The ids of the runs here, and of the jobs being claimed here (already not
        QUEUED in the store, not yet in running_here()): read after upcoming(), no job
        is in neither."""
        with self.lock:
            return set(self.runs) | self.claiming

    def tallies(self):
        """What ended here, by kind: ("jobs", status, worker), ("busy" | "audio", worker)
        seconds, ("callbacks", status)."""
        with self.lock:
            return dict(self.counters)

    def nodes(self):
        return self.storage.nodes()

    def close(self):
        """No change is stored any more: a run still going stays as it was last seen."""
        self.storage.close()


# ---------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------

# The `whisper` command line's decoding defaults (not whisper.transcribe()'s greedy ones),
# so a job's transcript is the one `whisper FILE` gives; both engines decode with them.
DECODING = {"beam_size": 5, "best_of": 5, "compression_ratio_threshold": 2.4,
            "logprob_threshold": -1.0, "no_speech_threshold": 0.6}
SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                "compression_ratio", "no_speech_prob")  # whisper's segment (verbose_json's)


def temperatures(start):
    """The CLI's fallback: from `start` up to 1.0 in steps of 0.2 (0.0 ... 1.0 by default)."""
    return tuple(round(start + 0.2 * i, 2) for i in range(int((1.0 - start) / 0.2 + 1e-6) + 1))


def _load_error(name, path, error):
    if os.path.exists(path):
        return f"model {name} could not be loaded from {path}: {_reason(error)}"
    return (f"model {name} could not be loaded: it is not at {path} and could not be "
            f"downloaded there ({_reason(error)})")


RATE = 16000  # samples a second, in everything Whisper decodes


def _vad():
    try:
        from faster_whisper import vad
    except ImportError:
        raise JobFailed("vad needs faster-whisper, which ships the Silero VAD model: "
                        "pip install 'whisperd[faster]'") from None
    return vad


def speech_only(audio, since=0.0):
    """The speech in RATE (16 kHz) audio from `since` seconds on, found by the Silero VAD
    model that ships with faster-whisper (with the defaults of its vad_filter), cut out
    and joined: (the speech, a Window whose pieces say where each stretch of it came
    from, or None if there is none; [(start, end)] seconds of all the speech heard)."""
    vad = _vad()
    track, pieces, used, speech = Track(None, audio, None), [], 0, []
    for chunk in vad.get_speech_timestamps(audio, vad.VadOptions()):
        speech.append((chunk["start"] / RATE, chunk["end"] / RATE))
        start = max(chunk["start"], round(since * RATE))
        if chunk["end"] > start:
            pieces.append(Piece(track, start, chunk["end"], used))
            used += chunk["end"] - start
    window = Window(pieces)
    return (window.audio(), window, speech) if pieces else (audio[:0], None, speech)


def parted(segment, parts, shares=None):
    """The segment cut into `parts`, [(start, end, fields)] in time order: with word
    timings, each word goes to the part its middle lies in (or nearest); without, its words are shared
    out in proportion to `shares` (default: the parts' lengths), each cut moved to a
    sentence's end within three words. Each part keeps the whole's decoder signals, is
    timed by its (start, end) within the whole's, gets `fields`, and no `tokens` (they were
    the whole's); a part left without words is dropped."""
    if segment.get("words"):
        def nearest(word):  # the part it lies in, or is nearest; of two, the one centred nearer
            middle = (word["start"] + word["end"]) / 2
            return min(range(len(parts)), key=lambda i: (
                max(parts[i][0] - middle, middle - parts[i][1], 0),
                abs((parts[i][0] + parts[i][1]) / 2 - middle)))
        groups = [[w for w in segment["words"] if nearest(w) == i] for i in range(len(parts))]
        texts = ["".join(w["word"] for w in group) for group in groups]
    else:
        pieces = re.findall(r"\s*\S+", segment["text"]) or [segment["text"]]
        said = shares or [end - start for start, end, _ in parts]
        cuts = [round(len(pieces) * sum(said[:i + 1]) / sum(said)) for i in range(len(said))]
        cuts = [min((c for c in range(max(1, cut - 3), min(len(pieces), cut + 3) + 1)
                     if pieces[c - 1][-1] in ".?!"), key=lambda c: abs(c - cut),
                    default=cut) for cut in cuts[:-1]] + cuts[-1:]  # at a sentence's end
        texts = ["".join(pieces[c0:c1]) for c0, c1 in zip([0] + cuts, cuts)]
        groups = [None] * len(parts)
    return [dict(segment, start=max(segment["start"], start), end=min(segment["end"], end),
                 text=text, tokens=[], **fields,
                 **({"words": group} if group is not None else {}))
            for (start, end, fields), text, group in zip(parts, texts, groups) if text.strip()]


def restore_times(result, window):
    """Times in whisper's result, from the speech-only audio back to the original's. A
    segment is timed by the stretches of speech it holds a second or more of (the rest
    is padding, or a timestamp a little off), so that none spans the silence cut out
    before or after it; a word, by the rule of packed windows (_to_track). A segment
    whose speech lies on both sides of a second or more of cut silence is split there:
    its words go by their own times, or else are shared out by the speech on each side
    (at the end of a sentence within three words of that share)."""
    track = window.pieces[0].track
    spans, island = [], 0  # (island, start, end) of each piece in the speech-only audio
    for i, p in enumerate(window.pieces):
        island += bool(i) and p.start - window.pieces[i - 1].end >= RATE
        spans.append((island, p.offset / RATE, (p.offset + p.length) / RATE))

    def back(start, end):
        start = round(_to_track(window, track, start, False), 3)
        return start, round(max(start, _to_track(window, track, end, True)), 3)

    def held(start, end):
        return [(k, a, b) for k, a, b in spans if min(end, b) - max(start, a) >= 1.0]

    def split(segment):
        """The segment as one part per island it holds speech in."""
        found = held(segment["start"], segment["end"])
        islands = sorted({k for k, _, _ in found})
        if len(islands) < 2:
            return [segment]
        extent = {k: (min(a for j, a, _ in found if j == k), max(b for j, _, b in found
                                                               if j == k)) for k in islands}
        said = [sum(min(segment["end"], b) - max(segment["start"], a)
                    for j, a, b in found if j == k) for k in islands]
        return parted(segment, [(*extent[k], {}) for k in islands], said)

    segments = [part for segment in result["segments"] for part in split(segment)]
    for i, segment in enumerate(segments):
        words = segment.get("words") or ()
        for word in words:
            word["start"], word["end"] = back(word["start"], word["end"])
        start, end = segment["start"], segment["end"]
        if found := held(start, end):
            start, end = max(start, found[0][1]), min(end, found[-1][2])
        segment["start"], segment["end"] = (words[0]["start"], words[-1]["end"]) if words \
            else back(start, end)
        segment["id"] = i
    result["segments"] = segments
    return result


# -- words nobody said ----------------------------------------------------------------------
#
# Whisper writes text over silence, noise and music ("you", "Thank you.", subtitle credits,
# a phrase repeated). Each segment gets `speech_ratio`, the share of its time in which the
# voice activity detector hears speech, and `suspect`, from that and the decoder's own
# signals by the rules below; bench/suspect.py measures them on real speech and on sounds
# with no speech at all (its rates are in the README).

SILENT = (0.2, 0.5)   # speech_ratio below, and seconds of speech heard below: over no speech
UNSURE = (0.6, -0.5)  # no_speech_prob above, avg_logprob below: the decoder itself doubts
REPEATS = 2.4         # compression_ratio above: a phrase repeated (whisper's own threshold)
# What Whisper says where nobody speaks: film subtitles' credits and sound tags (suspect
# alone), and the short words it ends silence with (suspect with a doubt besides).
TAGS = re.compile(r"^\s*[\[(♪*].*[\])♪*]\W*$|^\W*(music|applause|laughter|silence|"
                  r"blank_audio|no speech)\W*$|amara\.org|subtit|untertitel|"
                  r"sous-titr|castingwords|for watching|subscribe|продолжение следует",
                  re.IGNORECASE)
SHORT = {"you", "thank you", "thanks", "thank you very much", "thank you so much", "bye",
         "okay", "ok", "oh", "so", "hmm", "um", "uh", "the end", "i'm sorry", "yeah",
         "gracias", "merci", "danke", "grazie", "спасибо"}


def heard(audio, **options):
    """[(start, end)] seconds of speech in RATE audio, as the voice activity detector
    (Silero, with faster-whisper's defaults but `options`) hears it; None without
    faster-whisper."""
    try:
        vad = _vad()
    except JobFailed:
        return None
    return [(c["start"] / RATE, c["end"] / RATE)
            for c in vad.get_speech_timestamps(audio, vad.VadOptions(**options))]


def echoes(segments):
    """For each segment, whether one beside it says the same short thing (three words at
    most): Whisper repeating itself over noise, window after window."""
    texts = [segment["text"].strip().lower() for segment in segments]
    return [len(text.split()) <= 3 and text in texts[i - 1:i] + texts[i + 1:i + 2]
            for i, text in enumerate(texts)]


def is_suspect(segment, echo=False):
    """Whether the segment's words were likely never said (see SILENT and below); `echo`:
    a segment beside it says the same. Where the detector hears speech through most of
    it, the decoder's doubt, an echo or text of punctuation alone is not enough."""
    text, ratio = segment["text"].strip(), segment.get("speech_ratio")
    spoken = None if ratio is None else ratio * (segment["end"] - segment["start"])
    silent = ratio is not None and ratio < SILENT[0] and spoken < SILENT[1]
    doubt = (ratio is None or ratio < 0.5) and (echo or not re.search(r"\w", text) or (
        segment["no_speech_prob"] > UNSURE[0] and segment["avg_logprob"] < UNSURE[1]))
    short = re.sub(r"[^\w\s']", "", text.lower()).strip() in SHORT
    return bool(silent or doubt or TAGS.search(text) or segment["compression_ratio"] > REPEATS
                or (short and (segment["no_speech_prob"] > 0.5
                               or (spoken is not None and spoken < 1.0))))


class _Decoded:
    """A run's segments as they come, in the file's times: take(the engine's segments
    so far) maps those it had not seen with `mapping` and returns them all. Once
    returned, a segment is never changed (streams read them from other threads)."""

    def __init__(self, mapping):
        self.mapping, self.seen, self.segments = mapping, 0, []

    def take(self, segments):
        new = segments[self.seen:]
        self.seen = len(segments)
        if new:
            self.segments += self.mapping(new)
        return self.segments


def _resumption(before, vad):
    """Where a run resumes, in seconds, and the segments it keeps of a run cut short
    (`before`). Whisper decodes 30 s windows one after the other, each from where the one
    before ended, prompted with the text decoded before it: the run begins again at the
    start of the last window kept (its segments are decoded again), so that it decodes
    each window from where, and with what, the whole run would have (the audio given
    whole, from there: clip_timestamps). With vad (whose windows hold speech alone) it
    begins at the end of the last segment kept."""
    if not before:
        return 0.0, []
    if vad:
        return before[-1]["end"], before
    last = before[-1].get("seek", 0)  # mel frames, 100 a second
    return last / 100, [segment for segment in before if segment.get("seek", 0) < last]


def _shifted(segment, seconds):
    """A segment decoded from `seconds` into the audio, timed against the whole of it."""
    if seconds:
        for timed in [segment, *(segment.get("words") or ())]:
            timed["start"] = round(timed["start"] + seconds, 3)
            timed["end"] = round(timed["end"] + seconds, 3)
    return segment


def _prompt(before, initial_prompt):
    """A resumed run's prompt, as whisper would have prompted its next window: the job's
    initial_prompt, then every token decoded (timestamps included), from the last window
    decoded at a temperature over 0.5 on (whisper resets its prompt there; it keeps the
    last 223 tokens itself). (text, tokens): each engine encodes the text its own way. A
    prompt of the text alone, measured, made tiny.en decode the windows after it without
    a timestamp: one segment for 30 s, a sentence lost."""
    tokens = []
    for segment in before:
        tokens += segment.get("tokens") or []
        if segment.get("temperature", 0) > 0.5:
            tokens, initial_prompt = [], None
    return initial_prompt or None, tokens[-223:]


def _resumed(result, before, speech, drop, judged=True):
    """whisper's result of a run, with the segments kept before it (a run cut short),
    numbered as one, judged (see judge()) when `judged`. Its segments are copies: those
    reported as they were decoded, which streams may be reading, stay as they are."""
    result = dict(result, segments=[dict(segment, id=i) for i, segment in
                                    enumerate(before + result["segments"])])
    if before:
        result["text"] = "".join(segment["text"] for segment in before) + result["text"]
    return judge(result, speech, drop) if judged else result


def judge(result, speech, drop):
    """Marks each segment of whisper's result with speech_ratio (not where `speech`, the
    heard() stretches, is None) and suspect; with `drop`, the suspect ones leave it."""
    for segment, echo in zip(result["segments"], echoes(result["segments"])):
        start, end = segment["start"], max(segment["end"], segment["start"] + 0.02)
        if speech is not None:
            said = sum(max(0.0, min(end, b) - max(start, a)) for a, b in speech)
            segment["speech_ratio"] = round(min(said / (end - start), 1.0), 3)
        segment["suspect"] = is_suspect(segment, echo)
    if drop:
        kept = [segment for segment in result["segments"] if not segment["suspect"]]
        result.update(segments=kept, text="".join(segment["text"] for segment in kept))
    return result


ENGINES = {}  # name -> Engine subclass, filled as they are defined


class Engine:
    """One worker's models and decoding: loads models once and keeps them (LRU, optional
    idle TTL) and turns a job into whisper's result dict {"text", "segments", "language"}.

    The steps both engines share are here; a subclass names its library's calls (listed
    below). An engine belongs to one runner: its thread loads and decodes, and its
    prefetcher only calls load_audio(), which keeps no state.
    """

    name = ""
    model_suffix = ""  # NAME + this, in --model-dir, is a model on disk

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ENGINES[cls.name] = cls

    def __init__(self, settings, device, threads=0):
        self.settings, self.device, self.threads = settings, device, threads
        self.models = collections.OrderedDict()   # name -> model, least recently used first
        self.loaded = ()                          # their names, for other threads to read
        self.last_used = {}
        self.loads = 0
        self.loading = False  # a first download may take longer than the watchdog allows
        self.diarizer = None  # made at the first diarized job

    # -- which models exist ---------------------------------------------------------------

    @classmethod
    def on_disk(cls, model_dir, name):
        path = os.path.join(model_dir, name + cls.model_suffix)
        return path if cls.is_model(path) else None

    @classmethod
    def local(cls, model_dir):
        """The models in --model-dir, by name."""
        with contextlib.suppress(OSError):
            return [entry[:len(entry) - len(cls.model_suffix)] for entry in
                    sorted(os.listdir(model_dir)) if entry.endswith(cls.model_suffix)
                    and cls.is_model(os.path.join(model_dir, entry))]
        return []

    @classmethod
    def catalog(cls, model_dir):
        """Every model name a job may ask for: the original API's, the library's, and
        those in --model-dir under their own names."""
        return list(dict.fromkeys([*SEED_MODELS, *cls.known(), *cls.local(model_dir)]))

    # -- the model cache ------------------------------------------------------------------

    def model(self, name):
        """The model, loaded first if it is not; then the least recently used ones past
        --max-models are unloaded (a model that cannot be had unloads none)."""
        if name in self.models:
            self.models.move_to_end(name)
        else:
            started = time.monotonic()
            path = self.on_disk(self.settings.model_dir, name)
            self.loading = True
            try:
                self.models[name] = self.load(name, path)
            except Exception as e:
                raise ModelError(_load_error(name, path or os.path.join(
                    self.settings.model_dir, name + self.model_suffix), e)) from e
            finally:
                self.loading = False
            self.loads += 1
            self.loaded = tuple(self.models)
            gc.freeze()  # see Runner.run
            log(f"model {name} loaded on {self.device} in {time.monotonic() - started:.1f} s "
                f"({self.name})")
            while len(self.models) > self.settings.max_models:
                self.unload(next(iter(self.models)))
        self.last_used[name] = time.monotonic()
        return self.models[name]

    def unload(self, name):
        self.models.pop(name, None)
        self.last_used.pop(name, None)
        self.loaded = tuple(self.models)
        gc.unfreeze()  # the model may be in cycles: let the collector see it, once
        gc.collect()
        gc.freeze()
        self.release_memory()
        log(f"model {name} unloaded from {self.device}")

    def unload_idle(self):
        ttl = self.settings.model_ttl
        if ttl:
            for name, used in list(self.last_used.items()):
                if time.monotonic() - used > ttl:
                    self.unload(name)

    # -- a job ----------------------------------------------------------------------------

    def decode_options(self, job):
        """The job's decoding options, named as openai-whisper names them."""
        return {**DECODING, **{f.name: getattr(job, f.name) for f in OPTIONS
                               if f.metadata["decode"]},
                "language": None if job.language == AUTO_LANGUAGE else job.language,
                "initial_prompt": job.initial_prompt or None,
                "temperature": temperatures(job.temperature)}

    def batchable(self, job):
        """Whether the job may share a batch (--batch-size): faster-whisper only, and
        not for options that only sequential decoding honours."""
        return False

    def run(self, job, audio, report, before=()):
        """Transcribes one job's decoded audio; report(fraction done, the segments decoded
        so far, in the file's times, and the language once known) as it goes. `before`:
        the segments a run cut short kept, from which this one resumes (see _resumption).
        With vad, only the speech is decoded (both engines alike), and its times map back.
        Each segment is then judged (speech_ratio, suspect: see judge())."""
        model = self.model(job.model)
        options = self.decode_options(job)
        vad = options.pop("vad")
        since, before = _resumption(before, vad)
        if before and options["condition_on_previous_text"]:
            options["initial_prompt"] = _prompt(before, job.initial_prompt)
        share = 0.0  # of the audio, not given to the engine (vad: decoded before)
        if vad:
            rest, window, speech = speech_only(audio, since)
            if window is None:  # nothing but silence: nothing to decode
                return _resumed({"text": "", "segments": [], "language": options["language"]},
                                before, speech, job.drop_suspect)
            share = since * RATE / max(len(audio), 1)
            decoded = _Decoded(lambda new: restore_times({"segments": copy.deepcopy(new)},
                                                         window)["segments"])
        else:
            rest, speech, decoded = audio, None, _Decoded(lambda new: new)
            if since:
                options["clip_timestamps"] = [since]
        report(share, before)

        def progress(fraction, segments, language=None):
            report(share + (1 - share) * fraction, before + decoded.take(segments), language)

        judged = speech is not None or job.drop_suspect or job.format in ("json", "all")
        if speech is not None or not judged:  # nobody sees the flags: none are set
            result = self.transcribe(model, rest, options, progress)
        else:
            # The voice activity detector (one CPU thread) listens while the model
            # decodes: beside a GPU it costs no time.
            beside = ThreadPoolExecutor(1, "whisperd-vad")
            try:
                heard_there = beside.submit(heard, audio)
                result = self.transcribe(model, rest, options, progress)
                speech = heard_there.result()
            finally:
                beside.shutdown(wait=False)
        result["segments"] = decoded.take(result["segments"])
        return _resumed(result, before, speech, job.drop_suspect, judged)

    def speakers(self, job, audio, result):
        """whisper's result of a diarize: true job, each segment (and word) given its
        speaker (see attribute()); the voices are found on this worker's device."""
        if self.diarizer is None:
            if missing := speakers_missing():
                raise JobFailed(f"diarize cannot run: {missing}")
            self.diarizer = Resemblyzer(self.device)
        references = [self.load_audio(path) for path in job.speaker_references or ()]
        speech = heard(audio, **Resemblyzer.PARTED)
        if speech is None:  # no detector (faster-whisper absent): where whisper heard words
            speech = [(s["start"], s["end"]) for s in result["segments"]]
        turns, known = self.diarizer.turns(audio, speech, job.speakers, references)
        return attribute(result, turns, {voice: job.speaker_names[i]
                                         for voice, i in known.items()})

    def run_channels(self, job, audio, report):
        """diarize: "channels": each channel of `audio` (channels x samples) transcribed on
        its own, with voice activity detection where faster-whisper is installed (a channel
        is silent while the other party speaks, and whisper writes words over silence), as
        one speaker: SPEAKER_00 is the first channel, or speaker_names in channel order.
        The segments come in the order of their start; two voices at once stay apart. A
        run cut short starts again from the first channel."""
        alone = dataclasses.replace(job, vad=job.vad or importlib.util.find_spec(
            "faster_whisper") is not None)
        done, language, count = [], None, len(audio)
        for channel, samples in enumerate(audio):
            def progress(fraction, segments=(), language=None, channel=channel):
                report((channel + fraction) / count, done + list(segments or ()), language)
            result = self.run(alone, samples, progress)
            done += [dict(segment, speaker=channel) for segment in result["segments"]]
            language = language or result["language"]
        segments = sorted(done, key=lambda segment: (segment["start"], segment["speaker"]))
        return label({"text": "".join(s["text"] for s in segments), "segments": segments,
                      "language": language},
                     dict(enumerate(job.speaker_names or ())), ordered=False)

    def load_audio(self, path, channels=False):
        """The file's audio, RATE mono float32 (`channels`: an array of channels x samples,
        each RATE float32); AudioError when it cannot be decoded, or decodes to more than
        --max-audio-hours (a file whose header understates its length, to fill the memory),
        or takes more than DECODE_TIMEOUT."""
        hours = self.settings.max_audio_hours
        try:
            most = int(hours * 3600 * RATE) + 1
            audio = ffmpeg_decode(path, most, channel_count(path)) if channels else \
                self.decode_audio(path, most)
        except AudioError:
            raise
        except Exception as e:
            raise AudioError(f"could not decode the audio in {path}: {_reason(e)}") from e
        if audio.shape[-1] > hours * 3600 * RATE:
            raise AudioError(f"{path} decodes to more than {hours:g} hours of audio "
                             f"(--max-audio-hours), more than its header said")
        return audio

    # -- what each library does its own way ----------------------------------------------
    # A subclass defines prepare() (imports its library, resolves the device: in the
    # runner's thread), known() (its model names), is_model(path), load(name, path),
    # decode_audio(path, most samples), transcribe(model, audio, options, report), and
    # release_memory() where unloading a model leaves memory held.

    def release_memory(self):
        pass


def channel_count(path):
    """How many channels the file's first audio stream has (PyAV, else ffprobe)."""
    try:
        import av
    except ImportError:
        done = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0",
                               "-show_entries", "stream=channels", "-of", "csv=p=0", path],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        return int(done.stdout.split()[0]) if done.stdout.split() else 0
    with av.open(path, metadata_errors="ignore", timeout=PROBE_TIMEOUT) as container:
        streams = container.streams.audio
        return streams[0].codec_context.channels if streams else 0


def ffmpeg_decode(path, most, channels=1):
    """The file as whisper.load_audio()'s own ffmpeg command decodes it (so the same
    samples), `channels` of them kept apart (1: mixed down to mono): RATE float32,
    channels x samples; bounded by `most` samples a channel and DECODE_TIMEOUT."""
    import numpy
    command = ["ffmpeg", "-nostdin", "-threads", "0", "-i", path, "-f", "s16le", "-ac",
               str(channels), "-acodec", "pcm_s16le", "-ar", str(RATE), "-t",
               f"{most / RATE}", "-"]
    try:
        done = subprocess.run(command, capture_output=True, timeout=DECODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AudioError(f"decoding {path} took more than {DECODE_TIMEOUT:g} s") from None
    if done.returncode:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(said[-1] if said else f"ffmpeg exited {done.returncode}")
    samples = numpy.frombuffer(done.stdout, numpy.int16)
    samples = samples[:len(samples) // channels * channels].reshape(-1, channels).T
    return numpy.ascontiguousarray(samples, numpy.float32) / 32768.0


_progress = threading.local()  # .report: the running job's progress callback, per worker
PROMPTED = "(whisperd: the prompt's tokens)"


def _prompted_tokenizer(get_tokenizer, *args, **kwargs):
    """whisper.transcribe()'s tokenizer, but for a resumed run: its initial_prompt (a
    str there: PROMPTED) is encoded to _progress.prompt's text and tokens, timestamps and
    all, which faster-whisper takes as they are (see _prompt())."""
    tokenizer = get_tokenizer(*args, **kwargs)
    prompt = getattr(_progress, "prompt", None)
    if not prompt:
        return tokenizer
    tokenizer = copy.copy(tokenizer)  # whisper keeps one per language (lru_cache)
    encode, (text, tokens) = tokenizer.encode, prompt
    tokenizer.encode = lambda said, **more: (encode(" " + text.strip()) if text else []) + \
        tokens if said.strip() == PROMPTED else encode(said, **more)
    return tokenizer


class OpenAIWhisper(Engine):
    name = "openai-whisper"
    model_suffix = ".pt"

    @classmethod
    def known(cls):
        import whisper
        return whisper.available_models()

    @staticmethod
    def is_model(path):
        return os.path.isfile(path)

    def prepare(self):
        import torch
        import tqdm
        import whisper
        import whisper.transcribe
        self.torch, self.whisper = torch, whisper
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.threads:
            torch.set_num_threads(self.threads)

        class ProgressBar(tqdm.tqdm):
            """Stands in for the bar inside whisper.transcribe(): prints nothing and
            reports to the running job how far it is and the segments: transcribe()
            updates its bar after each window, once that window's segments are in its
            list `all_segments` and `seek` is where the next window starts; both are
            read there, with `language` (a test holds whisper to them: the segments of a
            long job are stored as they come)."""

            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                report = getattr(_progress, "report", None)
                if report and self.total:
                    seen = sys._getframe(1).f_locals
                    report(min(seen.get("seek", 0), self.total) / self.total,
                           seen.get("all_segments") or [], seen.get("language"))

        # whisper.transcribe() does `import tqdm` and calls `tqdm.tqdm(...)`: give its
        # module a tqdm namespace whose bar is ours.
        module = sys.modules["whisper.transcribe"]
        module.tqdm = type(sys)("tqdm")
        module.tqdm.tqdm = ProgressBar
        if not isinstance(module.get_tokenizer, functools.partial):  # once per process
            module.get_tokenizer = functools.partial(_prompted_tokenizer, module.get_tokenizer)

    def load(self, name, path):
        if path is None:
            return self.whisper.load_model(name, device=self.device,
                                           download_root=self.settings.model_dir)
        model = self.whisper.load_model(path, device=self.device)
        heads = getattr(self.whisper, "_ALIGNMENT_HEADS", {}).get(name)
        if heads:  # whisper only sets them for the checkpoints it downloads
            try:
                model.set_alignment_heads(heads)
            except RuntimeError:  # a checkpoint of another shape: keep the default
                log(f"model {path} is not OpenAI's {name}; word timings use whisper's "
                    f"default alignment heads")
        return model

    def release_memory(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    def decode_audio(self, path, most):
        """whisper.load_audio()'s own ffmpeg command (so the same samples), bounded."""
        return ffmpeg_decode(path, most)[0]

    def transcribe(self, model, audio, options, report):
        _progress.report = report
        if isinstance(options["initial_prompt"], tuple):  # see _prompt, _prompted_tokenizer
            _progress.prompt, options["initial_prompt"] = options["initial_prompt"], PROMPTED
        try:  # inference_mode: no autograd bookkeeping (2% faster on 2 cores, the same text)
            with self.torch.inference_mode():
                return self.whisper.transcribe(model, audio, verbose=None,
                                               fp16=self.device.startswith("cuda"), **options)
        finally:
            _progress.report = _progress.prompt = None


class FasterWhisper(Engine):
    name = "faster-whisper"
    model_suffix = ""  # a CTranslate2 folder

    @classmethod
    def known(cls):
        import faster_whisper
        return faster_whisper.available_models()

    @staticmethod
    def is_model(path):
        return os.path.isfile(os.path.join(path, "model.bin"))

    def prepare(self):
        import ctranslate2
        import faster_whisper
        self.faster_whisper = faster_whisper
        if self.device == "auto":
            self.device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.compute_type = self.settings.compute_type
        if self.compute_type == "auto":
            self.compute_type = "float16" if self.device.startswith("cuda") else "int8"

    def load(self, name, path):
        device, _, index = self.device.partition(":")
        return self.faster_whisper.WhisperModel(
            path or name, device=device, device_index=int(index or 0),
            compute_type=self.compute_type, cpu_threads=self.threads,
            download_root=self.settings.model_dir)

    def batchable(self, job):
        return bool(self.settings.batch_size) and job.pack and not (
            job.word_timestamps or job.initial_prompt or job.diarize == "channels")

    def batch(self, name):
        """A Batch of this model's windows (--batch-size, --pack); see Batches."""
        return Batch(BatchDecoder(self.model(name), self.settings.batch_timing),
                     self.settings.batch_size, self.settings.pack)

    def decode_audio(self, path, most):
        """faster_whisper.decode_audio()'s PyAV decoding (so the same samples), bounded:
        its reads by PROBE_TIMEOUT, its samples by `most`, its time by DECODE_TIMEOUT."""
        import av
        import numpy
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        fifo = av.AudioFifo()  # frames are resampled 500,000 samples at a time, as there
        pieces, count, deadline = [], 0, time.monotonic() + DECODE_TIMEOUT
        with av.open(path, metadata_errors="ignore", timeout=PROBE_TIMEOUT) as container:
            frames = container.decode(audio=0)
            while count < most:
                if time.monotonic() > deadline:
                    raise AudioError(f"decoding {path} took more than {DECODE_TIMEOUT:g} s")
                try:
                    frame = next(frames, None)
                except av.InvalidDataError:  # a damaged frame is skipped, as there
                    continue
                if frame is not None:
                    frame.pts = None
                    fifo.write(frame)
                    if fifo.samples < 500_000:
                        continue
                groups = [fifo.read()] if fifo.samples else []
                for group in groups + ([None] if frame is None else []):  # None: the rest
                    for piece in resampler.resample(group):
                        pieces.append(piece.to_ndarray().reshape(-1))
                        count += pieces[-1].size
                if frame is None:
                    break
        audio = numpy.concatenate(pieces) if pieces else numpy.zeros(0, numpy.int16)
        return audio[:most].astype(numpy.float32) / 32768.0

    def transcribe(self, model, audio, options, report):
        options["log_prob_threshold"] = options.pop("logprob_threshold")
        options["temperature"] = list(options["temperature"])
        if isinstance(options["initial_prompt"], tuple):  # see _prompt
            text, tokens = options["initial_prompt"]
            options["initial_prompt"] = (model.hf_tokenizer.encode(
                " " + text.strip(), add_special_tokens=False).ids if text else []) + tokens
        pieces, info = model.transcribe(audio, **options)
        segments = []
        for piece in pieces:  # a generator: decoding happens as we iterate
            segment = {"id": len(segments), **{k: getattr(piece, k) for k in SEGMENT_KEYS[1:]}}
            if piece.words is not None:
                segment["words"] = [{"word": w.word, "start": w.start, "end": w.end,
                                     "probability": w.probability} for w in piece.words]
            segments.append(segment)
            report(min(piece.end / info.duration, 1.0) if info.duration else 0.0, segments,
                   info.language)
        text = "".join(segment["text"] for segment in segments)
        return {"text": text, "segments": segments, "language": info.language}


# ---------------------------------------------------------------------------------------
# Batches: the windows of several jobs decoded together (faster-whisper, --batch-size)
# ---------------------------------------------------------------------------------------
#
# Whisper decodes 30 s windows, and a window costs the same however little speech is in
# it. With --batch-size N the worker keeps several jobs active at once and decodes up to
# N of their windows in one go (one encoder pass, one beam search), taking windows
# round-robin from the active jobs: each job ends as soon as its own windows are done,
# and a long job neither starves nor is starved by short ones. With --pack, the speech
# of several short jobs (after voice activity detection) shares one window, GAP seconds
# of silence apart, and each job gets back exactly its own segments, timed against its
# own file. Batched decoding is faster-whisper's batched pipeline's: the voice activity
# detector cuts the audio, temperature 0 only (no fallback), no conditioning on the text
# before. A window's text is timed by the model's timestamp tokens, or on a GPU by its
# words' alignment (--batch-timing), which is what lets each job have its own words.

WINDOW = 30 * RATE      # samples in one window
GAP = 2.0               # seconds of silence between two jobs in a window (measured:
                        # shorter gaps let a segment run from one job into the next)


@dataclasses.dataclass(eq=False)
class Track:
    """One job's audio in a batch."""
    job: Job
    audio: object        # numpy float32, 16 kHz mono
    language: str | None  # None: detected per window (packed: before, see plan())
    spans: list | None = None  # its speech_spans(), found ahead (None: when planned)
    since: float = 0.0    # seconds of the job's audio before `audio` (a resumed run)
    before: list = ()     # the segments a run cut short kept of them


@dataclasses.dataclass(eq=False)
class Piece:
    """A stretch of a track's speech, placed in a window."""
    track: Track
    start: int   # samples in the track
    end: int
    offset: int  # samples in the window

    @property
    def length(self):
        return self.end - self.start


@dataclasses.dataclass(eq=False)
class Window:
    """At most 30 s of audio to decode: pieces of one job, or of several short ones."""
    pieces: list
    depth: int = 0  # 0: planned; more: what was left of an unfinished window

    @property
    def length(self):
        return self.pieces[-1].offset + self.pieces[-1].length if self.pieces else 0

    @property
    def tracks(self):
        return list(dict.fromkeys(p.track for p in self.pieces))

    def audio(self):
        import numpy
        out = numpy.zeros(self.length, dtype=numpy.float32)
        for p in self.pieces:
            out[p.offset:p.offset + p.length] = p.track.audio[p.start:p.end]
        return out

    def regions(self):
        """{track: (start, end)} seconds of each track's speech in the window."""
        return {t: (min(p.offset for p in self.pieces if p.track is t) / RATE,
                    max(p.offset + p.length for p in self.pieces if p.track is t) / RATE)
                for t in self.tracks}

    def after(self, cuts):
        """What is left of the window past {track: seconds}, moved to start at 0."""
        pieces = []
        for p in self.pieces:
            cut_at = int(round(cuts[p.track] * RATE)) if p.track in cuts else None
            if cut_at is not None and p.offset + p.length > cut_at:
                cut = max(cut_at - p.offset, 0)
                pieces.append(Piece(p.track, p.start + cut, p.end, p.offset + cut - cut_at))
        if pieces:
            shift = pieces[0].offset
            pieces = [dataclasses.replace(p, offset=p.offset - shift) for p in pieces]
        return Window(pieces, self.depth + 1)


def speech_spans(audio):
    """The speech the voice activity detector hears in RATE audio, as a batch plans it:
    [(start, end)] samples, each at most a window long."""
    vad = _vad()
    return [(span["start"], span["end"]) for span in vad.get_speech_timestamps(
        audio, vad.VadOptions(max_speech_duration_s=WINDOW / RATE, min_silence_duration_ms=160))]


def _chunks(track):
    """The track's speech in windows' worth: lists of pieces of at most 30 s (as
    faster-whisper's collect_chunks groups them)."""
    if track.spans is None:
        track.spans = speech_spans(track.audio)
    chunks, current, used = [], [], 0
    for start, end in track.spans:
        end = min(end, start + WINDOW)
        if end <= start:
            continue
        if current and used + end - start > WINDOW:
            chunks.append(current)
            current, used = [], 0
        current.append(Piece(track, start, end, used))
        used += end - start
    return chunks + [current] if current else chunks


def plan(tracks, pack, detect=None):
    """The windows to decode for newly arrived tracks: one per chunk of a track's speech,
    but with `pack`, short tracks (one chunk) share windows, GAP apart, with tracks of the
    same language (those of none first given theirs by `detect`, when the model has more
    than one): the longest first, each into the first window with room (first-fit
    decreasing: 36 prompts of 5 to 15 s fill 12 windows, where taking them in turn filled
    14). A track with no speech gets no window."""
    gap, windows, alone, shared = int(GAP * RATE), [], [], []
    for track in tracks:
        chunks = _chunks(track)
        if pack and len(chunks) == 1:
            alone.append(Window(chunks[0]))
        else:
            windows += [Window(chunk) for chunk in chunks]
    if detect:
        detect([(own.tracks[0], own.pieces) for own in alone
                if own.tracks[0].language is None])
    for own in sorted(alone, key=lambda window: -window.length):
        language = own.pieces[0].track.language
        window = next((w for w in shared if w.pieces[0].track.language == language
                       and w.length + gap + own.length <= WINDOW), None)
        if window is None:
            window = Window([])
            shared.append(window)
        base = window.length + gap if window.pieces else 0
        window.pieces += [dataclasses.replace(p, offset=base + p.offset) for p in own.pieces]
    return windows + shared


class BatchDecoder:
    """Decodes windows in batches, as faster-whisper's BatchedInferencePipeline does (one
    encoder pass, one beam search with the CLI's beam size 5) but with the text timed (by
    timestamp tokens, or by word alignment), so that the text of a window with several
    jobs can be given back to each job."""

    STRADDLE = 0.2   # seconds a segment may reach into a second job's speech
    PAUSE = 1.0      # seconds between two words that end a segment (timed by words)
    MAX_DEPTH = 3    # times an unfinished window is continued

    def __init__(self, model, timing="auto"):
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens
        self.model = model
        self.multilingual = model.model.is_multilingual
        self.tokenizer = Tokenizer(model.hf_tokenizer, self.multilingual, task="transcribe",
                                   language="en")
        self.suppress = list(get_suppressed_tokens(self.tokenizer, [-1]))
        # On a CPU one window at a time through the encoder is faster (measured: a batch
        # of 8 costs a third more a window); on a GPU, the whole batch at once.
        self.encode_alone = model.model.device == "cpu"
        # How a window's text is timed. By the model's timestamp tokens, as the CLI does;
        # but CTranslate2's timestamp rules grow faster than the batch on a GPU (a batch
        # of 32 windows took 7.2 s on an H200, 0.14 s decoded without timestamps), so
        # there the text comes without them and each word is placed by its cross-attention
        # alignment (0.03 s more for 32 windows): bench/RESULTS.md.
        self.by_words = timing == "words" or (timing == "auto" and not self.encode_alone)

    def _prompt(self, language, task):
        t = self.tokenizer
        if not self.multilingual:
            return [t.sot]
        return [t.sot, t.tokenizer.token_to_id(f"<|{language}|>"),
                t.transcribe if task == "transcribe" else t.translate]

    def _encode(self, windows):
        import numpy
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.transcribe import get_ctranslate2_storage
        extract = self.model.feature_extractor
        features = numpy.stack([pad_or_trim(extract(w.audio())[..., :-1], extract.nb_max_frames)
                                for w in windows])
        if self.encode_alone and len(windows) > 1:
            return get_ctranslate2_storage(numpy.concatenate([
                numpy.asarray(self.model.model.encode(get_ctranslate2_storage(f[None])))
                for f in features]))
        return self.model.model.encode(get_ctranslate2_storage(features))

    def detect(self, tracks):
        """Gives tracks about to be packed their language, each detected from its own
        speech ([(track, its pieces)]): then a window never holds two languages (detected
        per window, four jobs of four languages packed all came out in one of them)."""
        found = self.model.model.detect_language(self._encode(
            [Window(pieces) for _, pieces in tracks])) if tracks else []
        for (track, _), languages in zip(tracks, found):
            track.language = languages[0][0][2:-2]  # "<|fr|>": fr

    def decode(self, windows, task):
        """One result per window: {"segments": {track: [segment]}, "language",
        "redo": {track}: tracks whose text ran into another's (decode them alone),
        "rest": the window past where the model stopped early, or None}."""
        encoded = self._encode(windows)
        # One language a window (plan() packs by language), detected here for a job of
        # none decoded alone; an English-only model's is "en".
        languages = [w.pieces[0].track.language if self.multilingual else "en"
                     for w in windows]
        if None in languages:
            found = self.model.model.detect_language(encoded)
            languages = [language or detected[0][0][2:-2]
                         for language, detected in zip(languages, found)]
        untimed = [self.tokenizer.no_timestamps] if self.by_words else []
        results = self.model.model.generate(
            encoded, [self._prompt(language, task) + untimed for language in languages],
            beam_size=DECODING["beam_size"], max_length=self.model.max_length,
            suppress_blank=True, suppress_tokens=self.suppress, return_scores=True,
            return_no_speech_prob=True, max_initial_timestamp_index=50)
        if self.by_words:
            words = self._words(encoded, windows, results)
            return [self._split_words(*args) for args in zip(windows, results, languages, words)]
        outs = [self._split(*args) for args in zip(windows, results, languages)]
        if any(out["suspect"] for out in outs):  # ask the words where they were said
            words = self._words(encoded, windows, results)
            outs = [self._split(w, r, language, word) if out["suspect"] else out
                    for w, r, language, out, word in
                    zip(windows, results, languages, outs, words)]
        return outs

    def _words(self, encoded, windows, results):
        """The words of each window's text, timed by cross-attention alignment (as
        word_timestamps=True finds them): [[{"word", "tokens", "start", "end"}] a window]."""
        eot = self.tokenizer.eot
        texts = [[t for t in r.sequences_ids[0] if t < eot] or [eot] for r in results]
        frames = [min(math.ceil(w.length / RATE * 100), 3000) for w in windows]
        return self.model.find_alignment(self.tokenizer, texts, encoded, frames)

    def _split(self, window, result, language, words=None):
        """A window's tokens as segments, each given to the track it was said in."""
        t, first_stamp = self.tokenizer, self.tokenizer.timestamp_begin
        tokens = result.sequences_ids[0]
        score = result.scores[0] * len(tokens) / (len(tokens) + 1)  # length penalty 1
        duration, regions = window.length / RATE, window.regions()
        pieces, _, _ = self.model._split_segments_by_timestamps(
            tokenizer=t, tokens=tokens, time_offset=0.0,
            segment_size=math.ceil(duration) * self.model.frames_per_second,
            segment_duration=duration, seek=0)
        # Text after the last timestamp pair, with nothing to close it, is kept too.
        used = sum(len(p["tokens"]) for p in pieces)
        tail = tokens[used:]
        if used and any(token < t.eot for token in tail):
            start = (tail[0] - first_stamp) * 0.02 if tail[0] >= first_stamp \
                else pieces[-1]["end"]
            end = next((r1 for r0, r1 in regions.values() if r1 > start), duration)
            pieces.append({"start": start, "end": end, "tokens": tail})
        # Ending on a timestamp pair means "go on from there": the CLI's loop decodes
        # again from that time, and in a packed window it is how the model skips jobs.
        seek = None
        if len(tokens) >= 2 and tokens[-1] >= first_stamp and tokens[-2] >= first_stamp:
            seek = (tokens[-1] - first_stamp) * 0.02
        out = {track: [] for track in regions}
        redo, suspect = set(), False
        word_iter = iter(words or [])
        for piece in pieces:
            text = t.decode(piece["tokens"])
            n_text = sum(token < t.eot for token in piece["tokens"])
            spoken, got = [], 0
            while words is not None and got < n_text:
                word = next(word_iter, {"tokens": [0] * n_text, "start": 0.0, "end": 0.0})
                got += len(word["tokens"])
                spoken.append((word["start"], word["end"]))
            if not text.strip():
                continue
            start, end = piece["start"], max(piece["end"], piece["start"])
            hit = self._reached(regions, start, end)
            if len(hit) > 1 and words is not None:  # the words' own timings decide
                hit = list(dict.fromkeys(track for ws, we in spoken if we > ws
                                         for track, (r0, r1) in regions.items()
                                         if r0 <= (ws + we) / 2 <= r1))
            if len(hit) > 1:  # one segment holds the speech of two jobs
                suspect = True
                if words is not None:
                    redo.update(hit)
                continue
            track = hit[0] if hit else self._nearest(regions, (start + end) / 2)
            out[track].append(_segment(window, track, start, end, text, piece["tokens"],
                                       score, result.no_speech_prob))
        if suspect and words is None:
            return {"suspect": True}
        return self._rest(window, regions, out, seek, redo, language)

    def _split_words(self, window, result, language, words):
        """A window decoded without timestamps: each word goes to the track it was said
        in (its middle), and a track's words make segments, a new one after a sentence
        ends or a pause of PAUSE s. The window goes on past its last word where speech
        is left, as it goes on past a last timestamp pair. A word reaching STRADDLE s
        into the speech of two jobs means the text skipped some speech and its words were
        spread over it (a job in another language, say): each job is decoded alone."""
        regions, eot = window.regions(), self.tokenizer.eot
        if any(len(self._reached(regions, w["start"], w["end"])) > 1 for w in words):
            return self._rest(window, regions, {}, None, set(regions), language)
        n = sum(token < eot for token in result.sequences_ids[0])
        score = result.scores[0] * n / (n + 1)  # length penalty 1
        runs = []  # [(track, [word])]: the words of one segment
        for word in words:
            track = self._nearest(regions, (word["start"] + word["end"]) / 2)
            last = runs[-1][1][-1] if runs else None
            if last and (not word["word"].startswith(" ") or (
                    runs[-1][0] is track and last["word"].rstrip()[-1:] not in ".?!"
                    and word["start"] - last["end"] < self.PAUSE)):
                runs[-1][1].append(word)
            else:
                runs.append((track, [word]))
        out = {track: [] for track in regions}
        for track, run in runs:
            text = "".join(word["word"] for word in run)
            if text.strip():
                out[track].append(_segment(
                    window, track, run[0]["start"], max(run[-1]["end"], run[0]["start"]),
                    text, [t for word in run for t in word["tokens"]], score,
                    result.no_speech_prob))
        seek = max((word["end"] for word in words), default=None)
        return self._rest(window, regions, out, seek, set(), language)

    @staticmethod
    def _nearest(regions, at):
        """The track whose speech is nearest `at` s (0 s away: holds it)."""
        return min(regions, key=lambda tr: max(regions[tr][0] - at, at - regions[tr][1], 0))

    def _reached(self, regions, start, end):
        """The tracks whose speech `start` to `end` reaches more than STRADDLE s into."""
        return [track for track, (r0, r1) in regions.items()
                if min(end, r1) - max(start, r0) > self.STRADDLE]

    def _rest(self, window, regions, out, seek, redo, language):
        """A window's result: the tracks with speech past `seek` (where the model stopped)
        go on in what is left of the window; a track of a shared window that got no words
        is decoded again, alone."""
        cuts = {}
        if seek is not None and window.depth < self.MAX_DEPTH and (
                seek >= 1.0 or not window.depth):  # a continued window goes on moving
            cuts = {track: seek if out[track] else min(seek, r0)
                    for track, (r0, r1) in regions.items()
                    if track not in redo and r1 > seek + (1.0 if out[track] else 0)}
        if len(regions) > 1:  # reached, yet nothing said: decode it alone
            redo.update(track for track, segments in out.items()
                        if not segments and track not in cuts)
        for track in redo:
            out.pop(track, None)
        return {"segments": out, "language": language, "redo": redo, "suspect": False,
                "rest": window.after(cuts) if cuts else None}


def _segment(window, track, start, end, text, tokens, score, no_speech_prob):
    """A segment of `track`, from window times to the track's own."""
    begin = _to_track(window, track, start, False)
    end = max(begin, _to_track(window, track, end, True))
    raw = text.encode()
    return {"start": round(begin, 3), "end": round(end, 3),
            "text": text, "tokens": tokens, "temperature": 0.0, "avg_logprob": score,
            "no_speech_prob": no_speech_prob,
            "compression_ratio": len(raw) / len(zlib.compress(raw)) if raw else 0.0}


def _to_track(window, track, seconds, is_end, snap=0.5):
    """A time in the window as a time in the track's own audio. Where the voice activity
    detector cut silence out between two pieces, a start just before the joint goes to
    the next piece and an end just after it to the one before."""
    pieces = [p for p in window.pieces if p.track is track]
    at, k = int(round(seconds * RATE)), 0
    for i, p in enumerate(pieces):
        if p.offset < at or (not is_end and p.offset == at):
            k = i
    p, snap = pieces[k], int(snap * RATE)
    if is_end and k and at - p.offset < snap and pieces[k - 1].end != p.start:
        return pieces[k - 1].end / RATE
    if not is_end and k + 1 < len(pieces) and pieces[k + 1].offset - at < snap \
            and pieces[k + 1].start != p.end:
        return pieces[k + 1].start / RATE
    return (p.start + min(max(at - p.offset, 0), p.length)) / RATE


Entry = collections.namedtuple("Entry", "job audio before spans", defaults=((), None))


class Batch:
    """The jobs a worker decodes together: add() jobs as they come, step() decodes up to
    `size` windows, round-robin over the jobs, and returns the jobs it finished."""

    def __init__(self, decoder, size, pack):
        self.decoder, self.size, self.pack = decoder, size, pack
        self.pending = collections.OrderedDict()  # track -> deque of its windows
        self.planned = {}                         # track -> windows it had in all
        self.results = {}                         # track -> {"language", "segments"}
        self.task = None

    def __bool__(self):
        return bool(self.pending)

    def room(self, joining):
        """Whether another job would still find a place in the next step, which takes a
        window from each job in turn: the windows at the head of the jobs' queues, and
        those of the jobs joining (a window each; packed, a short one fills part of one)."""
        heads = len({id(windows[0]) for windows in self.pending.values() if windows})
        return heads + sum(min(1.0, (job.audio_duration or 30) / 30) if self.pack else 1
                           for job in joining) < self.size

    def accepts(self, job, model):
        return not self.pending or (job.task == self.task and job.model == model)

    def add(self, entries):
        """Plans the windows of newly claimed jobs: [(job, audio, the segments a run cut
        short kept, the audio's speech_spans() if found ahead)] (packing happens among
        them; a resumed job's audio starts at the end of its last kept segment, its speech
        spans cut there). All join, or (it raised) none."""
        tracks = []
        for job, audio, before, spans in (Entry(*entry) for entry in entries):
            before = list(before)
            since = before[-1]["end"] if before else 0.0
            cut = round(since * RATE)
            if spans is not None:
                spans = [(max(start, cut) - cut, end - cut) for start, end in spans if end > cut]
            tracks.append(Track(job, audio[cut:], None if job.language == AUTO_LANGUAGE
                                else job.language, since=since, before=before, spans=spans))
        _fault("batch.add")
        windows = plan(tracks, self.pack,
                       self.decoder.detect if self.decoder.multilingual else None)
        for track in tracks:
            self.task = track.job.task
            self.pending[track] = collections.deque(w for w in windows if track in w.tracks)
            self.planned[track] = max(len(self.pending[track]), 1)
            self.results[track] = {"language": track.language, "segments": []}

    def drop(self, job):
        """Forgets a job (cancelled): its windows are no longer decoded for it."""
        for track in [track for track in self.results if track.job is job]:
            del self.pending[track], self.planned[track], self.results[track]

    def progress(self):
        """{job: (fraction of its windows decoded, its segments so far)}: the segments
        before the first of its windows still to decode (they will not change), in the
        file's times and order, after those kept before."""
        out = {}
        for track, windows in self.pending.items():
            left = [p.start for w in windows for p in w.pieces if p.track is track]
            until = min(left) / RATE if left else math.inf
            decoded = sorted((s for s in self.results[track]["segments"]
                              if s["start"] - track.since < until), key=lambda s: s["start"])
            out[track.job] = (1 - len(windows) / self.planned[track], track.before + decoded)
        return out

    def _take(self):
        batch, taken = [], set()
        while len(batch) < self.size:
            track = next((tr for tr, windows in self.pending.items()
                          if any(id(w) not in taken for w in windows)), None)
            if track is None:
                break
            window = next(w for w in self.pending[track] if id(w) not in taken)
            batch.append(window)
            taken.add(id(window))
            self.pending.move_to_end(track)  # round-robin
        return batch

    def step(self):
        """Decodes one batch; returns {job: whisper's result} for the jobs it finished."""
        windows = self._take()
        for window, out in zip(windows, self.decoder.decode(windows, self.task)
                               if windows else []):
            mine = [t for t in window.tracks if window in self.pending.get(t, ())]
            for track in mine:
                self.pending[track].remove(window)
            for track, segments in out["segments"].items():
                if track in mine:
                    got = self.results[track]
                    got["segments"] += [_shifted(s, track.since) for s in segments]
                    got["language"] = got["language"] or out["language"]
            for track in out["redo"] & set(mine):  # start over, alone
                self.results[track]["segments"] = []
                self.pending[track] = collections.deque(plan([track], pack=False))
            rest = out["rest"]
            if rest is not None:
                rest.pieces = [p for p in rest.pieces
                               if p.track in mine and p.track not in out["redo"]]
                for track in rest.tracks:
                    self.pending[track].appendleft(rest)
        done = {}
        for track in [t for t, windows in self.pending.items() if not windows]:
            del self.pending[track], self.planned[track]
            result = self.results.pop(track)
            segments = [dict(s, seek=0) for s in sorted(result["segments"],
                                                        key=lambda s: s["start"])]
            language = result["language"] or ("en" if not self.decoder.multilingual else None)
            done[track.job] = _resumed(
                {"text": "".join(s["text"] for s in segments), "segments": segments,
                 "language": language}, track.before,
                [(a / RATE + track.since, b / RATE + track.since) for a, b in track.spans or ()],
                track.job.drop_suspect)
        return done


# ---------------------------------------------------------------------------------------
# Who said what: speakers
# ---------------------------------------------------------------------------------------
#
# A diarized job's segments (and words) get "speaker": SPEAKER_00, SPEAKER_01, ... in the
# order the voices are first heard (the labels of pyannote and whisperX), or a name the job
# gave. With diarize: "channels", each channel of the file is transcribed on its own and is
# one speaker (Engine.run_channels). With diarize: true, a Diarizer finds who speaks when
# in the job's audio (turns), and attribute() gives each word the voice heard at its middle
# and splits a segment where the voice changes. The one Diarizer here is Resemblyzer's: its
# voice encoder's trained weights ship in its wheel, so it works offline. Another (pyannote's
# pipeline from a local folder, say) would be a subclass with the same turns().

SPEAKERS_EXTRA = "pip install 'whisperd[speakers]'"


@functools.cache
def speakers_missing():
    """Why diarization cannot run here (what failed to import, how to install it), or
    None. The first diarized job to come pays for the imports (PyTorch's among them: a
    second or two), which its runner needs anyway."""
    try:
        with warnings.catch_warnings():  # Resemblyzer's webrtcvad: pkg_resources deprecated
            warnings.simplefilter("ignore")
            import resemblyzer  # noqa: F401
            import scipy.cluster.hierarchy  # noqa: F401
            import sklearn.metrics  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{_reason(e)}: {SPEAKERS_EXTRA}"
    return None


class Diarizer:
    """Who speaks when. turns(audio, speech, count, references) -> ([(start, end, voice)],
    {voice: index of the reference that is that voice}): seconds of RATE `audio`, voices
    numbered; `speech` the stretches [(start, end)] in which someone speaks; `count` how
    many voices, or None (found); `references` clips (RATE audio) of known voices."""

    def turns(self, audio, speech, count=None, references=()):
        raise NotImplementedError


class Resemblyzer(Diarizer):
    """Resemblyzer's voice encoder (GE2E, 256 numbers a voice), on the worker's device:
    1. The speech is cut into pieces of about UNIT s (the detector's stretches, parted by
       0.2 s of silence, cut evenly); each piece's voice is the mean of the encoder's
       embeddings of 1.6 s of it, one every 0.8 s.
    2. The pieces are clustered (average linkage, cosine distance). The number of voices,
       when not given, is the one of 2 to MAX_SPEAKERS whose clusters stand furthest apart
       (the silhouette), or 1 when none stands LEAST apart. A minute of speech is a few
       dozen pieces, and its silhouettes are noisy: of the counts within TIE of the best,
       the largest wins, and a voice then heard in one piece only, or in less than SMALL
       of the speech, joins the one nearest it. A voice split in two is mended that way;
       two voices merged would not be (bench/speakers.py measures it).
    3. A reference clip names the voice most like it, when more alike than SAME."""

    WINDOW, HOP = 160, 80       # mel frames (10 ms): 1.6 s heard by each embedding, 0.8 s apart
    PARTED = {"min_silence_duration_ms": 200, "speech_pad_ms": 50}  # the detector's options
    UNIT = 3.2                  # seconds of a piece of speech
    LEAST, TIE, SMALL, SAME = 0.3, 0.04, 0.05, 0.8
    MOST = 2000                 # pieces clustered; the others take the voice nearest them
    BATCH = 256                 # windows through the encoder at once

    def __init__(self, device):
        import torch
        from resemblyzer import VoiceEncoder  # imported once by speakers_missing()
        self.torch, self.encoder = torch, VoiceEncoder(device, verbose=False)

    def embed(self, audio, spans):
        """One unit vector for each span [(start, end)] of `audio`: its voice. The 1.6 s
        windows go through the encoder BATCH at a time (a 3-hour job's memory stays
        small), each added to its span's sum."""
        import numpy
        from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram
        least = self.WINDOW * RATE // 100
        sums, windows, owner = None, [], []

        def encode():
            nonlocal sums
            with self.torch.no_grad():
                mels = self.torch.from_numpy(numpy.stack(windows)).to(self.encoder.device)
                prints = self.encoder(mels).cpu().numpy()
            if sums is None:
                sums = numpy.zeros((len(spans), prints.shape[1]), prints.dtype)
            numpy.add.at(sums, owner, prints)
            windows.clear(), owner.clear()

        for i, (start, end) in enumerate(spans):
            a, b = int(start * RATE), int(end * RATE)
            if b - a < least:  # too short to hear: the 1.6 s around it
                a = max(0, min(len(audio) - least, (a + b - least) // 2))
                b = a + least
            piece = normalize_volume(audio[a:b], -30, increase_only=True)
            mel = wav_to_mel_spectrogram(numpy.pad(piece, (0, max(0, least - len(piece)))))
            count = max(1, math.ceil((len(mel) - self.WINDOW) / self.HOP) + 1)
            for first in numpy.linspace(0, max(0, len(mel) - self.WINDOW), count).astype(int):
                windows.append(mel[first:first + self.WINDOW])
                owner.append(i)
                if len(windows) == self.BATCH:
                    encode()
        if windows:
            encode()
        return sums / numpy.linalg.norm(sums, axis=1, keepdims=True)

    def voices(self, units, count):
        """A voice number for each unit vector: `count` clusters, or as many as found."""
        import numpy
        from scipy.cluster.hierarchy import fcluster, linkage
        from sklearn.metrics import silhouette_score
        labels = numpy.zeros(len(units), int)
        if len(units) < 2 or count == 1:
            return labels
        step = max(1, math.ceil(len(units) / self.MOST))
        sample = units[::step]
        tree = linkage(sample, "average", metric="cosine")
        if count:
            found = fcluster(tree, min(count, len(sample)), "maxclust") - 1
        else:
            tried = {}
            for k in range(2, min(MAX_SPEAKERS, len(sample) - 1) + 1):
                clusters = fcluster(tree, k, "maxclust") - 1
                if len(set(clusters)) > 1:
                    tried[k] = (silhouette_score(sample, clusters, metric="cosine"), clusters)
            best = max((score for score, _ in tried.values()), default=0)
            found = numpy.zeros(len(sample), int) if best < self.LEAST else \
                tried[max(k for k, (score, _) in tried.items() if score >= best - self.TIE)][1]
        labels = found if step == 1 else self._nearest(units, sample, found)
        while not count and len(set(labels)) > 1:  # a voice barely heard joins the nearest
            shares = {v: numpy.mean(labels == v) for v in set(labels)}
            least = min(shares, key=shares.get)
            if shares[least] >= self.SMALL and numpy.sum(labels == least) > 1:
                break
            centres = self._centres(units, labels)
            others = [v for v in centres if v != least]
            near = max(others, key=lambda v: centres[v] @ centres[least])
            labels[labels == least] = near
        return labels

    @staticmethod
    def _centres(units, labels):
        import numpy
        centres = {v: units[labels == v].mean(0) for v in sorted(set(labels))}
        return {v: c / numpy.linalg.norm(c) for v, c in centres.items()}

    def _nearest(self, units, sample, found):
        """Every unit's voice, where only `sample` was clustered: the nearest centre."""
        import numpy
        centres = self._centres(sample, found)
        nearest = (units @ numpy.stack(list(centres.values())).T).argmax(1)
        return numpy.array(list(centres))[nearest]

    def turns(self, audio, speech, count=None, references=()):
        spans = [(a + i * (b - a) / n, a + (i + 1) * (b - a) / n) for a, b in speech
                 for n in [max(1, round((b - a) / self.UNIT))] for i in range(n)]
        if not spans:
            return [], {}
        units = self.embed(audio, spans)
        labels = self.voices(units, count)
        turns = []
        for (start, end), voice in zip(spans, labels.tolist()):
            if turns and turns[-1][2] == voice and start - turns[-1][1] < 0.5:
                turns[-1] = (turns[-1][0], end, voice)
            else:
                turns.append((start, end, voice))
        known, centres = {}, self._centres(units, labels)
        alike = sorted(((float(clip @ centre), voice, i) for i, clip in enumerate(
            self.embed_clips(references)) for voice, centre in centres.items()), reverse=True)
        for similarity, voice, i in alike:
            if similarity >= self.SAME and voice not in known and i not in known.values():
                known[voice] = i
        return turns, known

    def embed_clips(self, clips):
        """One unit vector for each whole clip (a reference: one voice alone)."""
        return [self.embed(clip, [(0, len(clip) / RATE)])[0] for clip in clips]


def _voice_at(turns, start, end):
    """The voice of `turns` heard most between start and end, else the nearest one."""
    best = max(turns, key=lambda t: (min(end, t[1]) - max(start, t[0]),
                                     -min(abs(start - t[1]), abs(end - t[0]))))
    return best[2]


def attribute(result, turns, names=None):
    """whisper's result, each segment (and word) given its speaker from `turns` (see
    Diarizer), labelled (see label()). A segment in which the voice changes is split
    (see parted()): with word timings where its words' voices change (each word has the
    voice heard at its middle; a word alone between two of another voice takes theirs);
    without, where another voice is heard for SWITCH seconds or more of it."""
    segments = []
    for segment in result["segments"]:
        start, end, words = segment["start"], segment["end"], segment.get("words")
        if not turns:
            parts = [(start, end, 0)]
        elif words:
            voices = [_voice_at(turns, w["start"], w["end"]) for w in words]
            for i in range(1, len(voices) - 1):
                if voices[i - 1] == voices[i + 1] != voices[i]:
                    voices[i] = voices[i - 1]
            runs = [[w for w, _ in run] + [voice] for voice, run in
                    itertools.groupby(zip(words, voices), key=lambda pair: pair[1])]
            parts = [(run[0]["start"], run[-2]["end"], run[-1]) for run in runs]
        else:
            parts = []
            for a, b, voice in turns:
                a, b = max(start, a), min(end, b)
                if b <= a:
                    continue
                if parts and (parts[-1][2] == voice or b - a < SWITCH):
                    parts[-1] = (parts[-1][0], b, parts[-1][2])
                elif parts and parts[-1][1] - parts[-1][0] < SWITCH:
                    parts[-1] = (parts[-1][0], b, voice)
                else:
                    parts.append((a, b, voice))
            parts = parts or [(start, end, _voice_at(turns, start, end))]
        if len(parts) == 1:
            segments.append(dict(segment, speaker=parts[0][2]))
        else:
            segments += parted(segment, [(a, b, {"speaker": v}) for a, b, v in parts])
    return label(dict(result, segments=segments), names or {})


SWITCH = 1.0  # seconds of another voice that split a segment without word timings


def label(result, names, ordered=True):
    """The result with each segment's (and word's) voice number turned into its label:
    names[voice] where named, else SPEAKER_00, SPEAKER_01, ... in the order first heard
    (`ordered`), or by voice number (channels). Segments numbered again."""
    labels, unnamed = dict(names), 0
    for voice in ([s["speaker"] for s in result["segments"]] if ordered
                  else sorted({s["speaker"] for s in result["segments"]})):
        if voice not in labels:
            labels[voice] = f"SPEAKER_{(unnamed if ordered else voice):02d}"
            unnamed += 1
    segments = []
    for i, segment in enumerate(result["segments"]):
        segment = dict(segment, id=i, speaker=labels[segment["speaker"]])
        if segment.get("words"):
            segment["words"] = [dict(w, speaker=segment["speaker"]) for w in segment["words"]]
        segments.append(segment)
    return dict(result, segments=segments)


def _labelled(result, ext):
    """The result as `ext`'s writer should write a diarized one: each segment's text (and
    first word) after its speaker's label, as TXT ("LABEL: "), SRT ("[LABEL]: ") and
    WebVTT (a voice tag, "<v LABEL>") show one."""
    form = {"txt": "{}: ", "srt": "[{}]: ", "vtt": "<v {}>"}.get(ext)
    if form is None or not any("speaker" in s for s in result["segments"]):
        return result
    segments = []
    for segment in result["segments"]:
        said = form.format(segment["speaker"])
        segment = dict(segment, text=said + segment["text"].strip())
        if segment.get("words"):
            first = segment["words"][0]
            segment["words"] = [dict(first, word=" " + said + first["word"].lstrip()),
                                *segment["words"][1:]]
        segments.append(segment)
    return dict(result, segments=segments)


def write_result(ext, result, file, **options):
    """openai-whisper's writer for `ext` writes the result into `file`; a diarized one with
    its speakers (see _labelled; TSV gets a speaker column)."""
    if ext == "tsv" and any("speaker" in s for s in result["segments"]):
        print("start", "end", "speaker", "text", sep="\t", file=file)
        for segment in result["segments"]:  # as openai-whisper's WriteTSV writes them
            print(round(1000 * segment["start"]), round(1000 * segment["end"]),
                  segment["speaker"], segment["text"].strip().replace("\t", " "), sep="\t",
                  file=file)
        return
    whisper_part("utils").get_writer(ext, ".").write_result(_labelled(result, ext),
                                                            file=file, **options)


# ---------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------

UMASK = os.umask(0)  # the only way to read it is to set it: put it straight back
os.umask(UMASK)


@functools.cache
def whisper_part(name):
    """openai-whisper's module `name` (utils: its writers; tokenizer: its language names),
    which import nothing of whisper's own. Once openai-whisper is imported (its engine),
    that one; else the file alone, since the package imports PyTorch, which the
    faster-whisper engine does not need (1.5 s at each start, measured, and its memory)."""
    if "whisper" in sys.modules:
        return importlib.import_module(f"whisper.{name}")
    folder = importlib.util.find_spec("whisper").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(f"whisperd.whisper_{name}",
                                                  os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def transcript(result, ext="txt"):
    """whisper's result as openai-whisper's writer for `ext` writes it (see write_result)."""
    text = io.StringIO()
    write_result(ext, result, text)
    return text.getvalue()


def write_outputs(result, job):
    """Writes the job's files with openai-whisper's own writers, all or none.

    Every file is written to a hidden temp file in the output folder and flushed to disk;
    only when all of them are whole are they renamed over `<input name>.<ext>`, so a reader
    never sees half a file, and a job that cannot write them all (a full disk, a folder
    gone) leaves nothing behind.
    """
    base = os.path.splitext(os.path.basename(job.path))[0]
    folder = job.output_path
    # The job's id in the temp names: jobs of inputs with the same name may be writing
    # into this folder at once (two workers, two nodes), and each clears only its own.
    prefix, suffix = f".{base}.{job.id}.", ".whisperd-tmp"
    with contextlib.suppress(OSError):  # left by a daemon killed while writing this job
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(suffix):
                os.unlink(os.path.join(folder, name))
    options = {f.name: getattr(job, f.name) for f in OPTIONS if f.metadata["writer"]}
    temps = {}
    try:
        for ext in WRITTEN_FORMATS if job.format == "all" else (job.format,):
            fd, temps[ext] = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                write_result(ext, result, file, **options)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temps[ext], 0o666 & ~UMASK)  # mkstemp makes 0600; honour the umask
        for ext, temp in list(temps.items()):
            os.replace(temp, os.path.join(folder, f"{base}.{ext}"))
            del temps[ext]
    finally:
        for temp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(temp)
    with contextlib.suppress(OSError):  # make the renames themselves durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------------------
# Runners: one thread per device
# ---------------------------------------------------------------------------------------

Decoded = collections.namedtuple("Decoded", "audio spans")  # spans: speech_spans(audio) or None


class Ahead:
    """Audio decoded ahead, by job id: the runners' prefetchers fill it, the runner that
    claims a job takes its audio, no job is decoded twice; at most `seconds` of audio."""

    def __init__(self, jobs, seconds):
        self.jobs, self.seconds = jobs, seconds  # queued jobs looked at; audio held at most
        self.lock = threading.Condition()
        self.audio = {}     # job id -> Decoded (or the error decoding it raised)
        self.busy = set()   # job ids being decoded
        self.taken = set()  # job ids whose audio a runner took (or decodes itself)

    def reserve(self, upcoming, keep):
        """The first of `upcoming` jobs to decode now, or None; drops what is no longer
        upcoming nor running (`keep`: their ids)."""
        with self.lock:
            for job_id in set(self.audio) - keep:  # deleted, or ended meanwhile
                del self.audio[job_id]
            self.taken &= keep
            held = sum(a.audio.size for a in self.audio.values()  # samples, all channels
                       if not isinstance(a, Exception))
            job = next((j for j in upcoming if j.id not in self.audio and j.id not in self.busy
                        and j.id not in self.taken), None)
            if job is None or held / RATE >= self.seconds:
                return None
            self.busy.add(job.id)
            return job

    def put(self, job_id, audio):
        with self.lock:
            self.busy.discard(job_id)
            self.audio[job_id] = audio
            self.lock.notify_all()

    def take(self, jobs):
        """(job, its Decoded audio) for one of `jobs`: one decoded ahead, else (job, None)
        for one nobody decodes (the caller decodes it, and nobody else will), else the
        first decoded by another thread, waited for."""
        with self.lock:
            job = self.lock.wait_for(lambda: next((j for j in jobs if j.id in self.audio), None)
                                     or next((j for j in jobs if j.id not in self.busy), None))
            self.taken.add(job.id)
            return job, self.audio.pop(job.id, None)


RunnerState = collections.namedtuple("RunnerState", "name device ready error models running "
                                                    "loads ahead beat loading")


class Runner(threading.Thread):
    """One device's thread (a "worker" in the API's words), where its engine, its models
    and its jobs live. Its whole life: prepare the engine, then claim the next job and run
    it (or, with --batch-size, a batch the jobs behind it join) and hand back an Outcome on
    `outcomes` for every job it claimed, whatever it raised; until stop(). Meanwhile its
    prefetchers (on a CPU one, for a batch; up to `prefetchers` on a GPU) decode the audio
    of the jobs a batch claimed, then of the next ones, into `ahead`, and find the speech in
    what a batch will take. It tells the queue its progress and publishes state(); it calls
    nothing else."""

    TICK = 1.0  # seconds between idle housekeeping rounds (model TTL, watchdog)

    def __init__(self, engine, job_queue, outcomes, ahead, suffix="", prefetchers=1):
        super().__init__(name=f"runner {engine.device}{suffix}", daemon=True)
        self.engine, self.queue, self.outcomes, self.ahead = engine, job_queue, outcomes, ahead
        self.suffix, self.prefetchers = suffix, prefetchers
        self.stopping = threading.Event()   # take no new job
        self.abort = threading.Event()      # interrupt the running jobs
        self.beat = time.monotonic()        # last sign of life, for the watchdog
        self.ready = False
        self.error = None                   # why the engine cannot start
        self.running = ()                   # the jobs it runs now
        self.joining = []                   # jobs claimed for a batch, their audio not taken
        self.busy = 0.0                     # seconds spent running jobs, not handed back yet
        self.decoded_ahead = 0

    @property
    def label(self):
        """The runner's name: its device (auto until resolved), numbered when it repeats."""
        return self.engine.device + self.suffix

    def state(self):
        """What this runner publishes, for health, metrics and the status line."""
        return RunnerState(self.label, self.engine.device, self.ready, self.error,
                           self.engine.loaded, tuple(self.running), self.engine.loads,
                           self.decoded_ahead, self.beat, self.engine.loading)

    def stop(self):
        self.stopping.set()
        self.queue.wake()

    def run(self):
        try:
            self.engine.prepare()
            whisper_part("utils")  # the writers, before the freeze
        except Exception as e:  # e.g. torch missing: every job will say so
            self.error = f"the {self.engine.name} engine cannot start: {_reason(e)}"
            log(self.error)
        # The libraries and models are never garbage: out of the cyclic collector's reach
        # (here and after each model load), a full collection walks only what came since.
        # faster-whisper's decode_audio() ran one for every file: without this, 100 ms
        # with the GIL held, for which every HTTP answer waited.
        gc.freeze()
        self.ready = True
        # A CPU's decoding keeps its cores busy: audio decoded beside it slowed openai-whisper
        # by 8 to 15% (bench/RESULTS.md), so an unbatched CPU runner decodes each job's audio
        # itself, between two jobs, as the library's loop does; a batching one has one thread
        # read its claimed jobs while it reads others. A GPU's leaves the cores free, and a
        # batch takes the audio faster than one thread reads it and finds its speech.
        batching = bool(self.engine.settings.batch_size)
        for n in range(int(batching) if self.engine.device == "cpu" else self.prefetchers):
            threading.Thread(target=self.prefetch, daemon=True,
                             name=f"prefetch {self.label} {n}").start()
        while (job := self.next_job()) is not None:
            if not self.error and self.engine.batchable(job):
                self.run_batch(job)
            else:
                self.run_job(job)
            self.running, self.joining = (), []

    def next_job(self, wait=True, accept=lambda job: True):
        """The next job, now RUNNING here; None once stopping (or, without `wait`, when
        none is queued that `accept` takes)."""
        while not self.stopping.is_set():
            seen = self.queue.version
            try:
                job = self.queue.claim(self.label, accept)
                if job is not None or not wait:
                    return job
            except Exception as e:  # StoreUnavailable, or a bug: no job starts now
                self.queue.troubled(f"no job can start: {_reason(e)}")
                if not wait:
                    return None
            self.queue.wait_for_change(seen, self.TICK)
            self.beat = time.monotonic()
            self.engine.unload_idle()
        return None

    def prefetch(self):
        """Decodes the audio of the next queued jobs while this runner is busy, so that it
        goes from one job (or batch) to the next without waiting for ffmpeg, and first that
        of the jobs a batch has claimed but not read yet (beside the runner reading them);
        for a job a batch will take, finds its speech too (on a GPU, the voice activity
        detector on the batch's path took half a packed queue's time: bench/RESULTS.md)."""
        while not self.stopping.is_set() and not self.error:
            seen = self.queue.version
            try:
                upcoming = self.queue.upcoming(self.ahead.jobs)
                keep = {job.id for job in upcoming} | self.queue.held_here()
                job = self.ahead.reserve(list(self.joining) + upcoming, keep)
            except Exception:  # StoreUnavailable, or worse: the runner decodes it itself
                job = None
            if job is None:
                self.queue.wait_for_change(seen, self.TICK)
                continue
            self.ahead.put(job.id, self.decode(job))

    def decode(self, job):
        """The job's Decoded audio, with its speech when a batch will take it; or the
        error decoding raised (the claiming runner fails the job with it)."""
        try:
            _fault("decode")
            decoded = Decoded(self.engine.load_audio(job.path, job.diarize == "channels"), None)
        except Exception as e:  # an AudioError, or one nobody foresaw: the job's failure
            return e
        if self.engine.batchable(job):
            try:
                return decoded._replace(spans=speech_spans(decoded.audio))
            except Exception:  # the batch looks for it again, and fails the job there
                pass
        return decoded

    def audio(self, jobs):
        """(job, its Decoded audio or the error decoding raised) for one of `jobs`, claimed
        here: one decoded ahead, else one decoded now while the prefetchers decode others
        (a batch's joining jobs are theirs first), else one they finish."""
        job, decoded = self.ahead.take(jobs)
        if decoded is None:
            decoded = self.decode(job)
        else:
            self.decoded_ahead += 1
        if job.audio_duration is None and not isinstance(decoded, Exception):
            try:
                self.queue.progress(job, audio_duration=round(decoded.audio.shape[-1] / RATE, 3))
            except Exception as e:  # StoreUnavailable: the job fails, as it would later
                decoded = e
        return job, decoded

    def report(self, job, done, segments=None, language=None):
        """A run's progress (see JobQueue.progress); the language detected is shown (and
        kept for a resumed run) once known."""
        self.beat = time.monotonic()
        if self.abort.is_set():
            raise Interrupted()
        if self.queue.cancelled(job.id):
            raise JobFailed(CANCELLED)
        known = {"language": language} if language and job.language == AUTO_LANGUAGE else {}
        self.queue.progress(job, done, segments, **known)

    def hand_back(self, job, result, started=None):
        """An Outcome for the job: whisper's result, a JobFailed, or None (interrupted),
        with this runner's busy time since the last one."""
        busy, self.busy = self.busy, 0.0
        self.outcomes.put(Outcome(job, result, 0.0 if started is None else
                                  round(time.monotonic() - started, 3), busy))

    @staticmethod
    def failure(job_or_batch, error):
        """A JobFailed for an error nobody foresaw: still only these jobs' failure."""
        if isinstance(error, JobFailed):
            return error
        log(f"{job_or_batch} raised: " + "".join(traceback.format_exception_only(error)).strip())
        return JobFailed(f"transcription failed: {type(error).__name__}: {_reason(error)}")

    def run_job(self, job):
        self.running = (job.id,)
        started = time.monotonic()
        try:
            if self.error:
                raise JobFailed(self.error)
            _, decoded = self.audio([job])
            if isinstance(decoded, Exception):
                raise decoded
            audio, report = decoded.audio, functools.partial(self.report, job)
            if job.diarize == "channels":
                result = self.engine.run_channels(job, audio, report)
            else:
                result = self.engine.run(job, audio, report, self.queue.resume(job))
            if job.diarize is True:
                result = self.engine.speakers(job, audio, result)
        except Interrupted:
            result, started = None, None
        except Exception as e:
            result = self.failure(f"job {job.id}", e)
        if started is not None:
            self.busy += time.monotonic() - started
        self.hand_back(job, result, started)

    def run_batch(self, first):
        """Decodes `first` and the queued jobs that may join it, a batch of windows at a
        time, until none is left. Jobs join in queue order while there is room; the first
        one that cannot join waits until the batch is done. Whatever raises fails the jobs
        it concerns (the joining ones, or all those held), never the runner."""
        held, self.joining = {first: time.monotonic()}, [first]  # claimed, not handed back
        voices = {}  # the audio of the diarized jobs held, whose speakers are found last

        def may_join(job):
            return self.engine.batchable(job) and batch.accepts(job, first.model)

        def join(wait):
            """Claims the queued jobs that may join while there is room; `wait` (a batch
            about to begin): while jobs keep coming at most `wait` s apart, waits for the
            next (a burst's first job is not decoded alone), a second in all."""
            until, came = time.monotonic() + 1.0, True
            while True:
                while batch.room(self.joining) and (job := self.next_job(False, may_join)):
                    held[job], came = time.monotonic(), True
                    self.joining.append(job)
                if not (wait and came and batch.room(self.joining) and time.monotonic() < until
                        and self.queue.wait_for_change(self.queue.version, wait)):
                    return
                came = False

        try:
            batch = self.engine.batch(first.model)
            while True:
                join(0 if batch else self.engine.settings.batch_wait)
                ready, left = {}, list(self.joining)
                while left:  # in the order their audio comes; they join in queue order
                    job, decoded = self.audio(left)
                    left.remove(job)
                    if isinstance(decoded, Exception):
                        self.hand_back(job, self.failure(f"job {job.id}", decoded), held.pop(job))
                        continue
                    ready[job] = Entry(job, decoded.audio, self.queue.resume(job), decoded.spans)
                    if job.diarize:
                        voices[job] = decoded.audio
                entries = [ready[job] for job in self.joining if job in ready]
                self.joining = []
                try:
                    batch.add(entries)
                except Exception as e:  # they did not join: only they fail
                    for job, *_ in entries:
                        self.hand_back(job, self.failure("a batch", e), held.pop(job))
                for job in [job for job in held if self.queue.cancelled(job.id)]:
                    batch.drop(job)
                    self.hand_back(job, JobFailed(CANCELLED), held.pop(job))
                self.running = tuple(job.id for job in held)
                if not batch:
                    return
                if self.abort.is_set():
                    raise Interrupted()
                step = time.monotonic()
                done = batch.step()
                self.busy += time.monotonic() - step
                self.beat = time.monotonic()
                for job, result in done.items():
                    if job in voices:
                        try:
                            result = self.engine.speakers(job, voices.pop(job), result)
                        except Exception as e:
                            result = self.failure(f"job {job.id}", e)
                    self.hand_back(job, result, held.pop(job))
                for job, (fraction, segments) in batch.progress().items():
                    self.queue.progress(job, fraction, segments)
        except Exception as e:  # a step raised, or worse: the jobs held fail (aborted: back)
            error = None if isinstance(e, Interrupted) else self.failure("a batch", e)
            for job in list(held):
                self.hand_back(job, error, held.pop(job))


# ---------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------

def sign(secret, body):
    """The X-Whisperd-Signature value: sha256=<hex HMAC-SHA256 of the raw body>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Callbacks(threading.Thread):
    """Delivers each finished job's JSON to its callback URL, off the worker threads.

    Deliveries are retried with exponential backoff and jitter on connection errors,
    timeouts, 5xx and 429 (a Retry-After is honoured); any other answer is final. Each
    attempt runs on a small pool, so a slow receiver holds up neither a worker nor another
    job's callback. `record(job, status, attempts, detail)` hears every attempt's outcome.
    """

    def __init__(self, settings, record):
        super().__init__(name="callbacks", daemon=True)
        self.settings, self.record = settings, record
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="callback")
        self.due = []                      # heap of (when, seq, job)
        self.seq = 0
        self.wake = threading.Condition()
        self.stopping = False
        self.in_flight = 0

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
            attempt = job.callback_attempts + 1
            body = json.dumps(job.to_json(), ensure_ascii=False).encode()
            status, detail, retry_after = self.deliver(job, body, attempt)
            if status == Callback.PENDING and attempt >= self.settings.callback_attempts:
                status = Callback.FAILED
            self.record(job, status, attempt, detail)
            if status == Callback.PENDING:
                backoff = self.settings.callback_backoff * 2 ** (attempt - 1)
                delay = max(retry_after or 0, backoff * random.uniform(0.8, 1.2))
                self.schedule(job, min(delay, 3600))
        except Exception as e:  # a bug here must not silently drop the delivery
            log(f"job {job.id} callback error: {type(e).__name__}: {e}")
        finally:
            with self.wake:
                self.in_flight -= 1
                self.wake.notify_all()

    def deliver(self, job, body, attempt):
        """One POST. Returns (the callback's status after it, what happened, Retry-After)."""
        headers = {"Content-Type": "application/json", "User-Agent": f"whisperd/{__version__}",
                   "X-Whisperd-Job": job.id, "X-Whisperd-Attempt": str(attempt)}
        if self.settings.callback_secret:
            headers["X-Whisperd-Signature"] = sign(self.settings.callback_secret, body)
        request = urllib.request.Request(job.callback, data=body, headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.callback_timeout) as r:
                return Callback.DELIVERED, f"HTTP {r.status}", None
        except urllib.error.HTTPError as e:
            if e.code == HTTPStatus.TOO_MANY_REQUESTS or e.code >= 500:
                try:
                    retry_after = max(0.0, float(e.headers.get("Retry-After")))
                except (TypeError, ValueError):  # none, or a date
                    retry_after = None
                return Callback.PENDING, f"HTTP {e.code}", retry_after
            return Callback.FAILED, f"HTTP {e.code}", None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            return Callback.PENDING, str(getattr(e, "reason", e)), None

    def stop(self, wait=5.0):
        """Stops scheduling; waits a little for deliveries already on the wire."""
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
            self.wake.wait_for(lambda: self.in_flight == 0, timeout=wait)
        self.pool.shutdown(wait=False, cancel_futures=True)


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
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    return int(usec) / 2e6 if usec and (not pid or pid == str(os.getpid())) else None


# ---------------------------------------------------------------------------------------
# Finisher: the files and the end of each job, off the runners' path
# ---------------------------------------------------------------------------------------

class Finisher(threading.Thread):
    """Takes the runners' Outcomes (`outcomes`, their one channel): writes the files, ends
    the jobs in the queue (those that come together in one commit), puts interrupted ones
    back, then lets go of each job's waiting upload and its callback."""

    def __init__(self, job_queue, callbacks, grace):
        super().__init__(name="finisher", daemon=True)
        self.queue, self.callbacks, self.grace = job_queue, callbacks, grace
        self.outcomes = queue.Queue()
        self.uploads = {}  # job id -> the Future of an upload's (result, JSON)
        self.stopping = False

    def stop(self):
        """Finishes what was handed back, then stops; the uploads still waiting are told."""
        self.stopping = True
        self.outcomes.put(None)
        self.join()
        for job_id in list(self.uploads):
            self.settle(job_id, ShuttingDown("whisperd is shutting down; send it again once "
                                             "it is back"))

    def settle(self, job_id, answer):
        """Gives an upload's client its answer: (result, JSON) or an exception."""
        future = self.uploads.pop(job_id, None)
        if future is not None:
            (future.set_exception if isinstance(answer, Exception) else future.set_result)(
                answer)

    def run(self):
        stop = False
        while not stop:
            items = [self.outcomes.get()]
            while not self.outcomes.empty():
                items.append(self.outcomes.get())
            stop = None in items
            outcomes = [o for o in items if o is not None]
            try:
                self.finish(outcomes, stop)
            except Exception as e:  # a bug: said, and the finisher goes on
                log(f"{len(outcomes)} job(s) could not be ended ({type(e).__name__}: "
                    f"{_reason(e)}); they run again on start")

    def finish(self, outcomes, stop):
        # A run a client cancelled ends cancelled, whatever its runner handed back: a
        # shutdown may have interrupted it (whichever of the two its runner saw first), or
        # the cancel came after its last step (a diarized job's speakers are found after
        # it). It neither runs again nor completes.
        outcomes = [o._replace(result=JobFailed(CANCELLED)) if not isinstance(
            o.result, JobFailed) and self.queue.cancelled(o.job.id) else o for o in outcomes]
        back = [o.job for o in outcomes if o.result is None]
        if back:
            try:
                self.queue.requeue(back, count_attempt=False)
                said = "it runs again on start"
            except StoreUnavailable as e:
                said = f"it runs again on start, counted as an attempt ({e})"
            for job in back:
                log(f"job {job.id} interrupted by shutdown; {said}")
        ended = [self.written(o) for o in outcomes if o.result is not None]
        for o in self.end(ended, give_up=stop) if ended else []:
            self.settle(o.job.id, (o.result, o.job.to_json()) if o.job.status == COMPLETED
                        else o.result if isinstance(o.result, JobFailed)
                        else JobFailed(o.job.error))
            if o.job.callback:
                self.callbacks.schedule(o.job)

    @staticmethod
    def written(outcome):
        """The outcome once the job's files are written; a JobFailed if they cannot be."""
        job, result = outcome.job, outcome.result
        if isinstance(result, dict) and not job.upload:
            try:
                write_outputs(result, job)
            except Exception as e:
                return outcome._replace(result=JobFailed(
                    f"no space left on {job.output_path}" if getattr(e, "errno", None) ==
                    errno.ENOSPC else f"could not write the files into {job.output_path}: "
                    f"{getattr(e, 'strerror', None) or _reason(e)}"))
        return outcome

    def end(self, outcomes, give_up):
        """Ends the jobs, retrying while the store cannot take them (a full disk, a
        database away): the files are written, the jobs wait. At shutdown it gives up
        after the grace, and the jobs run again on start."""
        deadline, delay = time.monotonic() + self.grace, 0.1
        while True:
            try:
                recorded = self.queue.end(outcomes)
                self.queue.troubled(None)
                return recorded
            except StoreUnavailable as e:
                self.queue.troubled(f"{len(outcomes)} finished job(s) wait to be recorded: "
                                    f"{e}; retrying")
                if (give_up or self.stopping) and time.monotonic() > deadline:
                    log("giving up: those jobs run again on start")
                    return []
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


# ---------------------------------------------------------------------------------------
# Status: health, metrics and the systemd status line, read-only
# ---------------------------------------------------------------------------------------

class Status:
    """What whisperd says of itself, from what the job queue and the runners publish
    (stats, speed, tallies, trouble; each runner's state()); it changes nothing."""

    def __init__(self, settings, node, job_queue, runners):
        self.settings, self.node, self.queue, self.runners = settings, node, job_queue, runners
        self.started = time.monotonic()
        self.stopping = False

    def states(self):
        return [runner.state() for runner in self.runners]

    def health(self):
        states = self.states()  # one snapshot: the workers and the default model agree
        workers = [{"name": s.name, "device": s.device, "ready": s.ready,
                    "models_loaded": list(s.models), "running": list(s.running),
                    **({"error": s.error} if s.error else {})} for s in states]
        try:
            stats, nodes = self.queue.stats(), self.queue.nodes()
        except StoreUnavailable:
            stats, nodes = {"Queued": None, "Running": None, "Processed": None}, []
        status = "shutting down" if self.stopping else \
            "store unavailable" if self.queue.trouble else "ok"
        return {"status": status, "version": __version__, "node": self.node,
                **({"nodes": nodes} if self.settings.store else {}),
                "engine": self.settings.engine,
                "device": ",".join(w["device"] for w in workers),
                "models_loaded": sorted({m for w in workers for m in w["models_loaded"]}),
                "worker_ready": all(w["ready"] for w in workers), "workers": workers,
                "store_error": self.queue.trouble, **stats, "speed": self.queue.speed(),
                "default_model": {k: v for k, v in self.model(
                    self.settings.default_model, states).items() if k in ("name", "state")},
                "uptime": round(time.monotonic() - self.started, 1)}

    def model(self, name, states):
        """A model's name, state (MODEL_STATES), path on disk, and the workers it is on."""
        path = ENGINES[self.settings.engine].on_disk(self.settings.model_dir, name)
        loaded = [s.name for s in states if name in s.models]
        return {"name": name, "state": "loaded" if loaded else "on disk" if path else
                "download", "path": path, "loaded_on": loaded}

    def models(self):
        states = self.states()
        return [self.model(name, states) for name in
                ENGINES[self.settings.engine].catalog(self.settings.model_dir)]

    def metrics(self):
        """/metrics in Prometheus' text format."""
        m = self.queue.tallies()
        stats, states = self.queue.stats(), self.states()  # 503 if unreachable
        labels, lines = [s.name for s in states], []
        ended = labels + sorted({k[2] for k in m if k[0] == "jobs"} - set(labels))  # "": none

        def metric(name, kind, help, samples):
            lines.extend([f"# HELP whisperd_{name} {help}", f"# TYPE whisperd_{name} {kind}"])
            for sample_labels, value in samples:
                pairs = ",".join(f'{k}="{v}"' for k, v in sample_labels.items())
                lines.append(f"whisperd_{name}{{{pairs}}} {value}" if pairs else
                             f"whisperd_{name} {value}")

        metric("jobs_finished_total", "counter", "Jobs finished since start, by final status "
               "and the worker that ran them.", [({"status": s, "worker": w}, m.get(
                   ("jobs", s, w), 0)) for s in FINISHED for w in ended])
        metric("jobs", "gauge", "Jobs now queued or running.",
               [({"status": QUEUED}, stats["Queued"]), ({"status": RUNNING}, stats["Running"])])
        metric("queue_length", "gauge", "Jobs waiting in the queue.", [({}, stats["Queued"])])
        metric("audio_seconds_total", "counter", "Seconds of audio transcribed, by worker.",
               [({"worker": w}, round(m.get(("audio", w), 0), 3)) for w in labels])
        metric("transcription_seconds_total", "counter", "Seconds the worker spent "
               "transcribing.", [({"worker": w}, round(m.get(("busy", w), 0), 3)) for w in labels])
        metric("worker_jobs", "gauge", "Jobs the worker runs now.",
               [({"worker": s.name}, len(s.running)) for s in states])
        metric("callback_attempts_total", "counter", "Callback deliveries tried, by the "
               "callback's status after each (pending: another attempt is due).",
               [({"status": s}, m.get(("callbacks", s), 0)) for s in Callback.SENT])
        metric("audio_decoded_ahead_total", "counter", "Jobs whose audio was decoded "
               "while a worker was busy with others.", [({}, sum(s.ahead for s in states))])
        metric("model_loads_total", "counter", "Models loaded, by worker.",
               [({"worker": s.name}, s.loads) for s in states])
        metric("event_streams", "gauge", "Event streams open (GET /transcription/job/ID/"
               "events, and OpenAI's stream=true).", [({}, self.queue.streams())])
        return "\n".join(lines) + "\n"

    def line(self):
        """The systemd status line."""
        many = len(self.runners) > 1
        running = [f"running {job.id} ({job.progress}%)" + (f" on {job.worker}" if many else "")
                   for job in self.queue.running_here()]
        try:
            queued = f"{self.queue.stats()['Queued']} queued"
        except StoreUnavailable:
            queued = "job store unreachable"
        return f"{queued}; " + ("; ".join(running) or "idle")

    def alive(self, ping):
        """Every runner alive, and none stuck: each took a job, reported progress or sat
        idle within two pings (a model load, which may download, is allowed longer)."""
        now = time.monotonic()
        return all(runner.is_alive() for runner in self.runners) and all(
            s.loading or now - s.beat < 2 * ping for s in self.states())


# ---------------------------------------------------------------------------------------
# Service: a daemon's parts, wired, started and stopped
# ---------------------------------------------------------------------------------------

def _suffixes(devices):
    """What tells runners on the same device apart: cpu, cpu#2, cpu#3."""
    seen = collections.Counter()
    for device in devices:
        seen[device] += 1
        yield "" if seen[device] == 1 else f"#{seen[device]}"


class Service:
    """Makes a daemon's parts, starts them and stops them in order: the job queue, a runner
    per --device, the finisher, the callbacks, the status, the upkeep (watchdog, status
    line, leases). At the door it takes jobs (validated, probed, queued) and uploads."""

    AHEAD_JOBS = 4       # queued jobs decoded ahead, per runner and window of --batch-size
    AHEAD_SECONDS = 600  # audio held decoded ahead, at most
    PREFETCHERS = 4      # threads decoding ahead for a GPU's runner, at most

    def __init__(self, settings, node, address):
        self.settings = settings
        storage = PostgresStore(settings.store, node, address, settings.lease) \
            if settings.store else SQLiteStore(settings.state_dir, node)
        self.queue = JobQueue(storage, settings)
        engine = ENGINES[settings.engine]
        self.context = types.SimpleNamespace(  # what validate() needs to know
            allow_dir=settings.allow_dir, default_model=settings.default_model,
            model_dir=settings.model_dir, model_suffix=engine.model_suffix or "/",
            models=lambda: engine.catalog(settings.model_dir))
        self.callbacks = Callbacks(settings, self.queue.callback_attempted)
        self.finisher = Finisher(self.queue, self.callbacks, settings.shutdown_grace)
        cpu_runners = settings.devices.count("cpu")
        threads = max(1, (os.cpu_count() or 1) // cpu_runners) if cpu_runners > 1 else 0
        ahead = Ahead(self.AHEAD_JOBS * len(settings.devices) * max(1, settings.batch_size),
                      self.AHEAD_SECONDS)
        prefetchers = min(self.PREFETCHERS,  # a GPU runner's, the cores shared
                          max(1, (os.cpu_count() or 1) // len(settings.devices)))
        self.runners = [Runner(engine(settings, device, threads if device == "cpu" else 0),
                               self.queue, self.finisher.outcomes, ahead, suffix, prefetchers)
                        for device, suffix in zip(settings.devices, _suffixes(settings.devices))]
        self.status = Status(settings, node, self.queue, self.runners)
        self.upkeep = threading.Thread(target=self._keep_up, name="upkeep", daemon=True)
        self.uploads = os.path.join(settings.state_dir, "uploads")
        shutil.rmtree(self.uploads, ignore_errors=True)
        os.makedirs(self.uploads)
        self.recovered = self._schedule(self.queue.recover, at_start=True)

    def _schedule(self, due, at_start=False):
        """Schedules the callbacks due() returns; False while the job store is away."""
        try:
            for job in due():
                self.callbacks.schedule(job)
            return True
        except StoreUnavailable as e:  # the database is away: the upkeep tries again
            if at_start and isinstance(e, StoreRefused):
                raise  # a setting to change: no use waiting
            self.queue.troubled(f"the job store cannot be reached: {e}; retrying")
            return False

    def start(self):
        for thread in (*self.runners, self.finisher, self.upkeep, self.callbacks):
            thread.start()

    def stop(self, grace):
        """Takes no new job (503); lets the running ones finish within `grace` seconds,
        else interrupts them (they run again on start, not counted as an attempt);
        finishes what was transcribed. False when a runner is stuck in native code."""
        self.status.stopping = True
        for runner in self.runners:
            runner.stop()
        running = len(self.queue.running_here())
        log(f"stopping: no new jobs; waiting up to {grace:g} s for {running} running job(s)"
            if running else "stopping: no new jobs; no job is running")
        deadline = time.monotonic() + grace
        for runner in self.runners:
            runner.join(max(0.0, deadline - time.monotonic()))
        late = [runner for runner in self.runners if runner.is_alive()]
        if late:
            log(f"the running jobs did not finish within {grace:g} s; interrupting them, they "
                f"run again on start")
            for runner in late:
                runner.abort.set()
            for runner in late:
                runner.join(10)
        stuck = {runner.label for runner in self.runners if runner.is_alive()}
        if stuck:  # deep in a model load or a decode: leave their jobs to run again
            with contextlib.suppress(StoreUnavailable):
                self.queue.requeue([job for job in self.queue.running_here()
                                    if job.worker in stuck], count_attempt=False)
        self.finisher.stop()
        self.callbacks.stop()
        self.queue.close()
        return not stuck

    # -- at the door ----------------------------------------------------------------------

    def submit(self, body, upload=None, context=None):
        """Validates a job, probes its audio and queues it; returns its JSON as created.
        With `upload` (a Future), its result is handed to it in memory when it ends."""
        if self.status.stopping:
            raise ShuttingDown("whisperd is shutting down and takes no new jobs; retry once "
                               "it is back")
        if self.queue.stats()["Queued"] >= self.settings.max_queue:
            raise QueueFull()  # before the costly checks
        if shutil.disk_usage(self.settings.state_dir).free < MIN_FREE:
            raise StoreUnavailable(f"no space left on {self.settings.state_dir}", full=True)
        job = validate(body, context or self.context)
        try:
            job.audio_duration = probe(job.path)
            if (job.audio_duration or 0) > self.settings.max_audio_hours * 3600:
                raise Invalid(f"{os.path.basename(job.path)} holds "
                              f"{_span(job.audio_duration)} of audio; at most "
                              f"{self.settings.max_audio_hours:g} hours are accepted "
                              f"(--max-audio-hours)")
        except Invalid as e:
            raise HTTPError(e.status, str(e), "path") from None
        job.upload = upload is not None
        if upload is not None:
            self.finisher.uploads[job.id] = upload
        try:
            return self.queue.add(job)
        except Exception:
            self.finisher.uploads.pop(job.id, None)
            raise

    @contextlib.contextmanager
    def uploaded(self, upload, fields):
        """An OpenAI-style upload, queued as a job in the same queue: yields (its JSON as
        created, the Future of (whisper's result, its JSON)); its file is kept until this
        ends. Errors name the uploaded file's own name, never where it was kept."""
        filename, data = upload
        name = os.path.basename(filename or "").lstrip(".")[-100:] or "audio"
        folder = tempfile.mkdtemp(dir=self.uploads)
        audio = os.path.join(folder, name)
        context = self.context
        if context.allow_dir:  # the upload folder is whisperd's own
            context = types.SimpleNamespace(**dict(vars(context), allow_dir=[
                *context.allow_dir, os.path.realpath(self.uploads)]))
        try:
            clips = [(os.path.join(folder, clip_name), clip)  # given as (bytes, name)
                     for clip, clip_name in fields.get("speaker_references") or ()]
            for path, content in [(audio, data), *clips]:
                with open(path, "wb") as file:
                    file.write(content)
            if clips:
                fields = dict(fields, speaker_references=[path for path, _ in clips])
            future = Future()
            try:
                yield self.submit(dict(fields, path=audio, output_path=folder), future,
                                  context), future
            except HTTPError as e:
                e.message = re.sub(r"(speaker_references )?(\S*/)?\.reference-(\d+)\.[\w.+-]+",
                                   r"known_speaker_references[] \3",
                                   e.message.replace(audio, name))
                e.field = {"path": "file", "speaker_references": "known_speaker_references[]",
                           "speaker_names": "known_speaker_names[]"}.get(e.field, e.field)
                raise
            except JobFailed as e:
                status = HTTPStatus.BAD_REQUEST if isinstance(e, AudioError) \
                    else HTTPStatus.INTERNAL_SERVER_ERROR
                raise HTTPError(status, str(e).replace(audio, name)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def follow_upload(self, upload, fields):
        """An upload's events as it is decoded (JobQueue.events), then ("result", (whisper's
        result, the job's JSON)), or ("error", why it failed). Its client gone (the
        generator closed before the end), the job is cancelled: nobody awaits it."""
        with self.uploaded(upload, fields) as (job, done):
            ended = False
            try:
                for event in self.queue.events(job["id"]):
                    ended = ended or (event is not None and event[0] == "end")
                    yield event
                try:
                    yield "result", done.result()
                except HTTPError as e:  # raised by uploaded: the stream has begun
                    yield "error", e.message
            finally:
                if not ended:
                    with contextlib.suppress(Exception):
                        self.cancel(job["id"])

    def delete(self, job_id):
        job = self.queue.delete(job_id)
        self.finisher.settle(job_id, JobFailed("the job was deleted before it ran"))
        return job.to_json()

    def cancel(self, job_id):
        """Cancels a job (JobQueue.cancel); one that ended now has its callback sent.
        Returns its JSON, and whether it ended now."""
        job, ended = self.queue.cancel(job_id)
        if ended:
            self.finisher.settle(job_id, JobFailed(CANCELLED))
            if job.callback:
                self.callbacks.schedule(job)
        return self.queue.show(job_id) if not ended else job.to_json(), ended

    # -- upkeep ---------------------------------------------------------------------------

    def _keep_up(self):
        """Every second: systemd's watchdog and status line. Every third of a lease: the
        store's upkeep (with --store: this node's leases, the jobs and callbacks of nodes
        that stopped), and the recovery that waited for the store to be reachable."""
        ping, said, due = watchdog_interval(), None, 0.0
        while not self.status.stopping:
            if ping and self.status.alive(ping):
                sd_notify("WATCHDOG=1")
            now = self.status.line()
            if now != said:
                sd_notify(f"STATUS={now}")
                said = now
            if time.monotonic() >= due:
                due = time.monotonic() + self.settings.lease / 3
                if not self.recovered:
                    self.recovered = self._schedule(self.queue.recover)
                if self._schedule(self.queue.keep_up) and self.recovered and self.settings.store:
                    self.queue.troubled(None)  # it reached the database
            time.sleep(min(ping or 1.0, 1.0))


# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------

OPENAI_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")


class _TimedReads(io.RawIOBase):
    """A connection's reads, where one that the kernel ended (SO_RCVTIMEO) is a timeout,
    as http.server expects, not a short read."""

    def __init__(self, raw, timeout):
        super().__init__()
        self.raw, self.timeout = raw, timeout

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self.raw.readinto(buffer)
        if count is None:
            raise TimeoutError(f"no data for {self.timeout:g} s")
        return count

    def close(self):
        self.raw.close()
        super().close()


def openai_answer(result, job, response_format):
    """(body, content type) in OpenAI's shape for one response_format, from whisper's
    result and the job's JSON."""
    if response_format in ("srt", "vtt"):
        return transcript(result, response_format), "text/plain; charset=utf-8"
    if response_format == "text":
        return job["result"], "text/plain; charset=utf-8"
    text = result["text"].strip()
    if response_format == "json":
        return {"text": text}, None
    if response_format == "diarized_json":
        return {"task": "transcribe", "duration": job["audio_duration"], "text": text,
                "segments": openai_segments(result["segments"]),
                "usage": {"type": "duration", "seconds": job["audio_duration"]}}, None
    names = whisper_part("tokenizer").LANGUAGES
    body = {"task": job["task"], "language": names.get(job["language"], job["language"]),
            "duration": job["audio_duration"], "text": text,
            "segments": [{k: segment[k] for k in SEGMENT_KEYS} for segment in result["segments"]]}
    if job["word_timestamps"]:
        body["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"]}
                         for segment in result["segments"] for w in segment.get("words", [])]
    return body, None


def openai_segments(segments):
    """A diarized result's segments as OpenAI's diarized_json has them: labelled A, B, ...
    in the order first heard (where whisperd says SPEAKER_00, ...), or by their names."""
    return [{"type": "transcript.text.segment", "id": f"seg_{segment['id']}",
             "start": segment["start"], "end": segment["end"], "text": segment["text"].strip(),
             "speaker": re.sub(r"^SPEAKER_(\d+)$", lambda m: _letters(int(m[1])),
                               segment["speaker"])} for segment in segments]


def _letters(number):
    """0 -> A, 25 -> Z, 26 -> AA: OpenAI's labels of unnamed speakers."""
    return (_letters(number // 26 - 1) if number >= 26 else "") + chr(65 + number % 26)


# An answer sent as Server-Sent Events: `items` (None: a comment that keeps the stream
# alive), each turned into an event's bytes by encode(item).
EventStream = collections.namedtuple("EventStream", "items encode")


def _started_stream(items):
    """The generator `items`, its first item taken now (what it raises, it raises here:
    before an answer begins)."""
    first = next(items)

    def stream():
        yield first
        yield from items
    return stream()


def _sse(event):
    """One of JobQueue.events() as a Server-Sent Event."""
    kind, data, event_id = event
    return f"id: {event_id}\nevent: {kind}\n".encode() + _openai_sse(data)


def openai_stream(events, response_format):
    """OpenAI's streamed transcription, from Service.follow_upload's events: a
    transcript.text.delta for each segment's text, then transcript.text.done with the
    whole text (as its answer without stream would have it), or an error. diarized_json:
    a transcript.text.segment for each segment, when the job ends (its voices are found
    over the whole recording), then transcript.text.done."""
    first = True
    with contextlib.closing(events):  # a client gone: the upload's job is cancelled
        for event in events:
            if event is None:
                yield None  # a comment keeps the stream alive
            elif event[0] == "segment" and response_format != "diarized_json":
                delta = event[1]["text"].lstrip() if first else event[1]["text"]
                first = first and not delta
                if delta:
                    yield {"type": "transcript.text.delta", "delta": delta}
            elif event[0] == "result":
                result, job = event[1]
                if response_format == "diarized_json":  # the speakers are known at the end
                    yield from openai_segments(result["segments"])
                yield {"type": "transcript.text.done", "text": job["result"]
                       if response_format == "text" else result["text"].strip()}
            elif event[0] == "error":
                yield {"error": {"message": event[1], "type": "server_error", "param": None,
                                 "code": None}}


DIARIZE_MODEL = "gpt-4o-transcribe-diarize"


def _data_url(url, i):
    """known_speaker_references[i], a data: URL of audio, as (bytes, its file's name)."""
    match = re.fullmatch(r"data:([\w.+-]+/[\w.+-]+)?(;[^,]*)?;base64,(.*)", url.strip(),
                         re.DOTALL)
    try:
        data = base64.b64decode(match[3], validate=True) if match else None
    except ValueError:
        data = None
    if not data:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"known_speaker_references[] {i} must be a "
                        f"data: URL of audio (data:audio/wav;base64,...)",
                        "known_speaker_references[]")
    return data, f".reference-{i}." + (match[1] or "x/audio").split("/")[-1]


def _openai_sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def read_form(content_type, raw):
    """A multipart/form-data body as {name: text, or [texts], or (filename, bytes)}."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        raise HTTPError(HTTPStatus.BAD_REQUEST, "the multipart body could not be read")
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


def route(method, path, summary, ok, errors=(), public=False, document=True, **operation):
    """Declares a Handler method as the answer to METHOD on `path` (an OpenAPI template:
    /transcription/job/{id}), with its answers {status: answer}, the statuses of the errors
    it may raise (and 401 unless `public`) and the OpenAPI operation's other keys.
    /openapi.json is made from these alone; an answer left out is logged as a bug."""
    def mark(function):
        function.routes = [*getattr(function, "routes", []), types.SimpleNamespace(
            method=method, path=path, summary=summary, ok=ok, public=public, document=document,
            errors=errors + ((HTTPStatus.UNAUTHORIZED,) if not public else ()),
            operation=operation, pattern=re.compile(re.sub(r"\{\w+\}", "([^/]+)", path) + "/?"))]
        return function
    return mark


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _answer(description, schema=None, text=False, **more):
    media = "text/plain" if text else "application/json"
    return {"description": description,
            **({"content": {media: {"schema": schema or {"type": "string"}}}}
               if schema or text else {}), **more}


def _request_field(f):
    """A job option as a client may send it: null (and "" for strings) mean the default."""
    schema = dict(f.metadata["schema"], description=f.metadata["help"])
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    schema["type"] = list(dict.fromkeys(kinds + ["null"]))
    if "enum" in schema:
        schema["enum"] = [*schema["enum"], "", None]
    return schema


ERRORS = {  # what each error status means, in /openapi.json
    HTTPStatus.BAD_REQUEST: "Invalid input; `field` names it",
    HTTPStatus.UNAUTHORIZED: "Missing or wrong token", HTTPStatus.FORBIDDEN: "Outside --allow-dir",
    HTTPStatus.NOT_FOUND: "No such job", HTTPStatus.CONFLICT: "Job not QUEUED",
    HTTPStatus.LENGTH_REQUIRED: "No Content-Length", HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
    "Body too large", HTTPStatus.INTERNAL_SERVER_ERROR: "The job failed",
    HTTPStatus.SERVICE_UNAVAILABLE: "Queue full, shutting down, or the job store unreachable "
                                    "(Retry-After)",
    HTTPStatus.INSUFFICIENT_STORAGE: "No space left in --state-dir (Retry-After)"}
STORE = (HTTPStatus.SERVICE_UNAVAILABLE,)  # what a route that reads the job store may add
BODY = (HTTPStatus.BAD_REQUEST, HTTPStatus.LENGTH_REQUIRED, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
TAKE = (HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.INSUFFICIENT_STORAGE)  # a new job's
_STRING = {"type": "string"}
_COUNTS = {k: {"type": "integer"} for k in ("Queued", "Running", "Processed")}
_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": _STRING}
_AUDIO = {  # OpenAI's audio endpoints, both: their route()'s answers, errors and body
    "ok": {HTTPStatus.OK: {"description": "The transcript, in response_format", "content": {
        "application/json": {"schema": {"type": "object"}}, "text/plain": {"schema": _STRING},
        "text/event-stream": {"schema": _STRING}}}},
    "errors": (*BODY, HTTPStatus.INTERNAL_SERVER_ERROR, *TAKE),
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"}, "model": _STRING,
            "language": _STRING, "prompt": _STRING,
            "response_format": {"type": "string", "enum": list(OPENAI_FORMATS)},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "timestamp_granularities[]": {"type": "array", "items": {
                "type": "string", "enum": ["word", "segment"]}},
            "stream": {"type": "boolean", "description": "true: Server-Sent Events as the "
                       "text is decoded (transcript.text.delta, then transcript.text.done); "
                       "response_format json or text"}}}}}}}
_WORKER = {"type": "object", "required": ["name", "device", "ready"], "properties": {
    "name": _STRING, "device": _STRING, "ready": {"type": "boolean"},
    "models_loaded": {"type": "array", "items": _STRING},
    "running": {"type": "array", "items": _STRING}, "error": _STRING}}
SCHEMAS = {
    "Job": {"type": "object", "required": list(WIRE), "properties": {
        f.name: dict(f.metadata["schema"], description=f.metadata["help"]) for f in FIELDS}},
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": _STRING, "field": _STRING}},
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": _STRING, "type": _STRING, "param": {"type": ["string", "null"]},
            "code": {"type": "null"}}}}},
    "Health": {"type": "object", "required": ["status", "engine", "device", "workers"],
               "properties": {"status": _STRING, "engine": _STRING, "device": _STRING,
                              "models_loaded": {"type": "array", "items": _STRING},
                              "workers": {"type": "array", "items": _WORKER},
                              "store_error": {"type": ["string", "null"]},
                              "default_model": {"type": "object", "properties": {
                                  "name": _STRING, "state": {"enum": MODEL_STATES}}},
                              "speed": {"type": ["number", "null"]}, **_COUNTS}}}


def openapi_document(routes):
    """GET /openapi.json: every declared route, as OpenAPI 3.1."""
    paths = {}
    for r in routes:
        if not r.document:
            continue
        error = "OpenAIError" if r.path.startswith("/v1/") else "Error"
        paths.setdefault(r.path, {})[r.method.lower()] = {
            "summary": r.summary, **r.operation, "responses": {
                **{str(int(status)): answer for status, answer in r.ok.items()},
                **{str(int(status)): _answer(ERRORS[status], _ref(error))
                   for status in r.errors if status not in r.ok}}}
    return {"openapi": "3.1.0",
            "info": {"title": "whisperd", "version": __version__, "description":
                     "Whisper speech-to-text behind a small HTTP job API. Any path answers "
                     "404 when it is not one of these, and 405 (with Allow) to a method it "
                     "does not take."},
            "paths": paths,
            "components": {"schemas": SCHEMAS,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{}, {"bearer": []}]}


def refusal(error, method, max_queue):
    """(status, message, field, headers) of an exception that ends a request, or None:
    the one place where the job store's and the queue's errors become statuses."""
    if isinstance(error, HTTPError):
        return error.status, error.message, error.field, error.headers
    if isinstance(error, NotFound):
        return HTTPStatus.NOT_FOUND, str(error), None, {}
    if isinstance(error, NotQueued):
        return HTTPStatus.CONFLICT, str(error), None, {}
    if isinstance(error, QueueFull):
        return (HTTPStatus.SERVICE_UNAVAILABLE, f"the queue is full ({max_queue} jobs "
                f"waiting); retry later", None, {"Retry-After": "30"})
    if isinstance(error, ShuttingDown):
        return HTTPStatus.SERVICE_UNAVAILABLE, str(error), None, {"Retry-After": "10"}
    if isinstance(error, StoreUnavailable):
        message = {"POST": f"whisperd cannot take new jobs now: {error}; every job accepted "
                           f"before is safe; retry later",
                   "DELETE": f"the job cannot be deleted now: {error}; retry later"}.get(
            method, f"the job store cannot answer now: {error}; retry later")
        return (HTTPStatus.INSUFFICIENT_STORAGE if error.full else
                HTTPStatus.SERVICE_UNAVAILABLE), message, None, {"Retry-After": "30"}
    return None


# GET /: one page for a person, no assets from elsewhere. The server renders what is now
# (a screenshot, a text browser or `curl` sees it all); its script fetches the page again
# every second and swaps its <main>, sends the token and the cancel buttons' POSTs.
PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>$title</title>
<style>
:root{color-scheme:light dark;--mut:#888;--ok:#2a7;--bad:#c33;--line:#8884}
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;padding:12px 16px;max-width:1100px}
h1{font-size:20px;margin:0 12px 0 0;display:inline}
h2{font-size:15px;margin:18px 0 6px;border-bottom:1px solid var(--line)}
h3{font-size:14px;margin:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 16px}
.mut,.empty,.na{color:var(--mut)}
#conn,.error,[data-status=FAILED] .st{color:var(--bad)}
[data-status=COMPLETED] .st{color:var(--ok)}
#auth{border:1px solid var(--line);padding:8px;margin:10px 0;border-radius:6px}
[hidden]{display:none}
.run{display:grid;grid-template-columns:minmax(0,3fr) minmax(160px,2fr) 4em auto;gap:2px 12px;align-items:center;padding:6px 0;border-bottom:1px solid var(--line)}
.run p{margin:0;grid-column:1/-1}
.run pre.live{grid-column:1/-1;margin:2px 0 0;max-height:8.5em}
.run pre.live:empty{display:none}
progress{width:100%;height:14px}
table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:2px 8px 2px 0;border-bottom:1px solid var(--line)}
.id,.options{font:12px ui-monospace,monospace}
summary{cursor:pointer;padding:3px 0}
summary span{margin-right:12px}
.st{font-size:12px;font-weight:700}
pre{white-space:pre-wrap;margin:4px 0 8px 16px;padding:6px;border-left:3px solid var(--line);max-height:320px;overflow:auto}
#smi{white-space:pre;overflow:auto;font-size:12px;margin:4px 0}
</style></head><body>
<form id="auth"$form_hidden><label>This whisperd needs a token:
<input id="token" type="password" autocomplete="off" size="28"></label>
<button id="token-ok" type="submit">Use token</button> <span id="auth-msg" class="error"></span></form>
<span id="conn"></span>
$main
<h2>nvidia-smi</h2><pre id="smi" class="na">waiting…</pre>
<script>
"use strict";
const KEY = 'whisperd-token', $ = s => document.querySelector(s);
let smiAt = 0;
const auth = () => (t => t ? {Authorization: 'Bearer ' + t} : {})(sessionStorage.getItem(KEY));
const live = {};  // job id -> {text: its segments so far, stop: its stream's AbortController}

// A running job's text as it is decoded: its event stream, read with fetch() (which,
// unlike EventSource, sends the token), one segment per line, as its result will be.
async function follow(id) {
  const job = live[id] = {text: '', stop: new AbortController()};
  try {
    const r = await fetch(`/transcription/job/${id}/events`, {headers: auth(), signal: job.stop.signal});
    const lines = r.body.pipeThrough(new TextDecoderStream()).getReader();
    for (let rest = '', got; !(got = await lines.read()).done;) {
      const blocks = (rest + got.value).split('\n\n');
      rest = blocks.pop();
      for (const block of blocks) {
        const kind = /^event: (.*)$/m.exec(block), data = /^data: (.*)$/m.exec(block);
        if (kind && data && kind[1] === 'segment') job.text += JSON.parse(data[1]).text.trim() + '\n';
      }
      show(id);
    }
  } catch (e) {}
  if (live[id] === job) delete live[id];  // ended, or broke: the next refresh follows it again
}
function show(id) {
  const pre = $(`article.run[data-job-id="${id}"] pre.live`);
  if (pre && live[id] && pre.textContent !== live[id].text) {
    pre.textContent = live[id].text;
    pre.scrollTop = pre.scrollHeight;
  }
}
function followRunning() {
  const running = [...document.querySelectorAll('article.run')].map(a => a.dataset.jobId);
  for (const id of Object.keys(live)) if (!running.includes(id)) { live[id].stop.abort(); delete live[id]; }
  for (const id of running) { if (!live[id]) follow(id); show(id); }
}

async function refresh() {
  try {
    const r = await fetch('/', {headers: auth(), cache: 'no-store'});
    const page = new DOMParser().parseFromString(await r.text(), 'text/html');
    const open = [...document.querySelectorAll('details[open]')].map(d => d.dataset.jobId);
    $('main').replaceWith(page.querySelector('main'));
    open.forEach(id => { const d = $(`details[data-job-id="${id}"]`); if (d) d.open = true; });
    document.title = page.title;
    const state = $('main').dataset.auth;
    if (state === 'wrong') sessionStorage.removeItem(KEY);
    $('#auth').hidden = state === 'ok';
    $('#auth-msg').textContent = state === 'wrong' ? 'wrong token, try again' : '';
    $('#conn').textContent = '';
    if (state === 'ok') followRunning();
    if (state === 'ok' && Date.now() - smiAt > 10000) {
      smiAt = Date.now();
      const s = await fetch('/smi', {headers: auth()});
      $('#smi').textContent = (await s.text()).trimEnd();
      $('#smi').className = s.ok ? '' : 'na';
    }
  } catch (e) { $('#conn').textContent = 'whisperd unreachable: ' + e.message; }
}
$('#auth').addEventListener('submit', e => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $('#token').value.trim());
  refresh();
});
document.addEventListener('click', async e => {
  const id = e.target.dataset.cancel;
  if (!id || !confirm(`Cancel job ${id}? It ends FAILED.`)) return;
  e.target.disabled = true;
  await fetch(`/transcription/job/${id}/cancel`, {method: 'POST', headers: auth()});
  refresh();
});
(async function tick() { await refresh(); setTimeout(tick, 1000); })();
</script></body></html>
"""


def _span(seconds):
    """A duration for a person: 12 s, 3m 05s, 1h 02m; - when unknown."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    hours, minutes = divmod(s // 60, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {s % 60:02d}s" if minutes \
        else f"{s} s"


def _ago(iso):
    return (datetime.now(timezone.utc) - datetime.fromisoformat(iso.replace("Z", "+00:00"))
            ).total_seconds() if iso else None


def page(health, jobs, auth, cluster):
    """The page, with the state `health` and `jobs` (the listing) say, or (`auth` needed
    or wrong) without it."""
    e = html.escape
    name = lambda j: e(os.path.basename(j["path"]))  # noqa: E731
    where = lambda j: " · ".join(e(x) for x in (  # noqa: E731
        j["id"], f"model {j['model']}", j["worker"] and f"worker {j['worker']}",
        cluster and j["node"] and f"node {j['node']}") if x)
    cancel = lambda j: f'<button data-cancel="{e(j["id"])}">Cancel</button>'  # noqa: E731
    if auth != "ok":
        return PAGE.replace("$title", "whisperd").replace("$form_hidden", "").replace(
            "$main", f'<main data-auth="{auth}"><h1>whisperd</h1><p class="empty">Enter '
                     f'the token (whisperd --token) to see the jobs.</p></main>')
    running = [j for j in jobs if j["status"] == RUNNING]
    queued = sorted((j for j in jobs if j["status"] == QUEUED), key=lambda j: j["position"] or 0)
    done = sorted((j for j in jobs if j["status"] in FINISHED),
                  key=lambda j: j["finished_at"] or "", reverse=True)
    defaults = {f.name: f.default for f in OPTIONS}
    out = ['<main data-auth="ok"><header><h1>whisperd</h1><span class="mut">'
           + " · ".join(e(str(x)) for x in (
               f"v{health['version']}", health["engine"], health["device"],
               f"up {_span(health['uptime'])}", f"node {health['node']}",
               health["status"] != "ok" and health["status"]) if x)
           + "</span><span>" + " · ".join(  # None: the job store cannot answer now
               f"{k.lower()} {'-' if health[k] is None else health[k]}"
               for k in ("Queued", "Running", "Processed"))
           + '</span><span>speed: <b id="speed">'
           + (f"{health['speed']:.1f}× realtime" if health["speed"] else "-")
           + "</b></span></header>"]
    if health["store_error"]:
        out.append(f'<p class="error">{e(health["store_error"])}</p>')
    out.append("<h2>Running</h2>")
    for j in running:
        out.append(
            f'<article class="run job" data-job-id="{e(j["id"])}" data-status="RUNNING" '
            f'data-progress="{j["progress"]}"><h3 title="{e(j["path"])}">{name(j)}</h3>'
            f'<progress max="100" value="{j["progress"]}"></progress>'
            f'<span class="pct">{j["progress"]}%</span>{cancel(j)}'
            f'<p class="mut">{where(j)} · <span class="elapsed">elapsed '
            f'{_span(_ago(j["started_at"]))}</span> · <span class="eta">ETA '
            f'{_span(j["eta"])}</span></p><pre class="live"></pre></article>')
    out.append("" if running else '<p class="empty">Nothing running.</p>')
    out.append("<h2>Queue</h2>")
    if queued:
        out.append("<table><tr><th>#</th><th>Job</th><th>File</th><th>Model</th><th>Options"
                   "</th><th>ETA</th><th></th></tr>")
    for j in queued:
        options = ", ".join(f"{k}={v}" if v is not True else k for k, v in j.items()
                            if k in defaults and k not in ("path", "model", "output_path")
                            and v not in (defaults[k], "", None))
        out.append(
            f'<tr class="job" data-job-id="{e(j["id"])}" data-status="QUEUED"><td '
            f'class="position">{j["position"]}</td><td class="id">{e(j["id"])}</td><td '
            f'title="{e(j["path"])}">{name(j)}</td><td>{e(j["model"])}</td><td '
            f'class="options">{e(options)}</td><td class="eta">{_span(j["eta"])}</td>'
            f'<td>{cancel(j)}</td></tr>')
    out.append("</table>" if queued else '<p class="empty">Queue empty.</p>')
    out.append("<h2>Finished</h2>")
    for j in done:
        ok = j["status"] == COMPLETED
        took = " for ".join(x for x in (j["Duration"] and f"took {_span(j['Duration'])}",
                                        j["audio_duration"] and
                                        f"{_span(j['audio_duration'])} of audio") if x)
        out.append(
            f'<details class="job" data-job-id="{e(j["id"])}" data-status="{j["status"]}">'
            f'<summary><span class="st">{j["status"]}</span><span title="{e(j["path"])}">'
            f'{name(j)}</span><span class="mut">{where(j)}</span><span>{e(took)}</span>'
            f'<span class="mut">{e((j["finished_at"] or "")[11:19])} UTC</span></summary>'
            f'<pre class="{"result" if ok else "error"}">'
            f'{e(j["result"] if ok else j["error"]) or "(empty)"}</pre></details>')
    out.append("" if done else '<p class="empty">No finished jobs yet.</p>')
    out.append("<h2>Workers</h2><ul>" + "".join(
        f'<li class="worker">{e(w["name"])}: {e(w["device"])} · '
        f'{"ready" if w["ready"] else e(w.get("error") or "not ready")} · models '
        f'{e(", ".join(w["models_loaded"]) or "none")} · running {len(w["running"])}</li>'
        for w in health["workers"]) + "</ul>")
    if cluster:
        out.append("<h2>Nodes</h2><ul>" + "".join(
            f'<li class="node">{e(n["name"])} · {e(n["url"] or "")} · seen '
            f'{e(n["last_seen"])}</li>' for n in health.get("nodes", [])) + "</ul>")
    title = " ".join(f"{j['progress']}%" for j in running)
    return PAGE.replace("$title", f"{title} · whisperd" if title else "whisperd").replace(
        "$form_hidden", " hidden").replace("$main", "\n".join(out) + "</main>")


def linger(connection, seconds=LINGER):
    """A lingering close, as Apache's and nginx's: a client still sending the body that an
    answer refused (413, 401, 404...) reads that answer. Closed with unread data, a socket
    resets the connection, and the client, still writing, gets a broken pipe instead."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(1.0)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and connection.recv(1 << 16):
            pass


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the `@route` methods below; every answer is JSON but the page's,
    /smi's and /metrics' text. Errors are raised (HTTPError, or the job queue's own) and
    turned into JSON in one place, handle_one()."""

    server_version = f"whisperd/{__version__}"
    protocol_version = "HTTP/1.1"        # keep-alive
    disable_nagle_algorithm = True
    wbufsize = -1                        # headers and body leave in one write (flushed per answer)
    unread = False                       # a request body not read: the connection then closes
    default_request_version = "HTTP/1.0"  # garbage gets a status line, not HTTP/0.9's bare body

    def setup(self):
        """An idle or slow client cannot hold a thread: the kernel ends a read or a write
        that waited --idle-timeout (SO_RCVTIMEO, SO_SNDTIMEO). The stdlib's `timeout`
        would do it with a poll() before every read and write: a quarter of the time of a
        small request."""
        super().setup()
        timeout = self.server.settings.idle_timeout
        limit = struct.pack("ll", int(timeout), int(timeout % 1 * 1e6))
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.connection.setsockopt(socket.SOL_SOCKET, option, limit)
        self.rfile = io.BufferedReader(_TimedReads(self.rfile.detach(), timeout))
        self.service = service = self.server.service
        self.queue, self.status = service.queue, service.status

    def handle(self):
        with contextlib.suppress(ConnectionResetError):  # the client left between requests
            super().handle()

    def finish(self):
        super().finish()  # the answer is flushed
        if self.unread:
            linger(self.connection)

    # -- dispatch -----------------------------------------------------------------------

    def handle_one(self):
        path, _, query = self.path.partition("?")
        self.unread = self.headers.get("Content-Length", "0").strip() not in ("", "0") or \
            "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        declared = None
        with self.server.quiet:  # an answer on its way: serve() waits for it before it exits
            self.server.answering += 1
        try:
            self.query = urllib.parse.parse_qs(query) if query else {}
            answer, params, declared = self.find_route(path)
            status, payload, *headers = answer(self, *params)
            self.declared(declared, status)
            self.respond(status, payload, **(headers[0] if headers else {}))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as error:
            refused = refusal(error, self.command, self.server.settings.max_queue)
            if refused is None:
                log(f"internal error on {self.command} {self.path}:\n{traceback.format_exc()}")
                self.respond(HTTPStatus.INTERNAL_SERVER_ERROR,
                             {"error": "internal error; the daemon's log says more"})
                return
            status, message, field, headers = refused
            self.declared(declared, status)
            if path.startswith("/v1/"):  # OpenAI's error shape, which its SDKs read
                body = {"error": {"message": message, "param": field, "code": None,
                                  "type": "invalid_request_error" if status < 500
                                  else "server_error"}}
            else:
                body = {"error": message, **({"field": field} if field else {})}
            self.respond(status, body, **headers)
        finally:
            with self.server.quiet:
                self.server.answering -= 1
                self.server.quiet.notify_all()

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = do_HEAD = handle_one

    @staticmethod
    def declared(route, status):
        """Says, as the bug it is, an answer that its route's declaration leaves out."""
        if route is not None and status not in route.ok and status not in route.errors:
            log(f"bug: answer {int(status)} to {route.method} {route.path} is not declared "
                f"in /openapi.json")

    def find_route(self, path):
        """(the answering method, the path's parameters, its declaration)."""
        methods, params = ROUTES.get(path.rstrip("/") or "/"), ()  # most paths are plain
        for pattern, candidates in () if methods else PATTERN_ROUTES:
            if match := pattern.fullmatch(path):
                methods, params = candidates, match.groups()
                break
        if not methods:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}; see GET "
                                                  f"/openapi.json")
        if self.command not in methods:
            allowed = ", ".join(methods)
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on "
                            f"{path}; use {allowed}", headers={"Allow": allowed})
        answer, declared = methods[self.command]
        if not declared.public and self.auth() != "ok":
            raise HTTPError(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send "
                            "'Authorization: Bearer <token>' (whisperd --token)",
                            headers={"WWW-Authenticate": 'Bearer realm="whisperd"'})
        return answer, params, declared

    def auth(self):
        """"ok" (the right token, or none needed), "needed" (none sent) or "wrong"."""
        token = self.server.settings.token
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if not token or (scheme.lower() == "bearer" and hmac.compare_digest(
                value.strip().encode(), token.encode())):
            return "ok"
        return "wrong" if value else "needed"

    def respond(self, status, payload, content_type=None, **headers):
        if isinstance(payload, EventStream):
            return self.stream(status, payload, headers)
        text = isinstance(payload, str)
        body = (payload if text else json.dumps(payload, ensure_ascii=False)).encode()
        content_type = content_type or (
            "text/plain; charset=utf-8" if text else "application/json")
        self.send_response(status)
        if status != HTTPStatus.NO_CONTENT:  # which has neither
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.close_connection |= self.unread  # an unread body must not be read as a request
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def stream(self, status, events, headers):
        """Server-Sent Events, each sent as it comes; the connection closes at the end. A
        client gone (or stalled past --idle-timeout) ends it, and what feeds it."""
        self.close_connection = True
        self.send_response(status)
        for name, value in {"Content-Type": "text/event-stream; charset=utf-8",
                            "Cache-Control": "no-store", "X-Accel-Buffering": "no",
                            "Connection": "close", **headers}.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        try:
            self.wfile.flush()
            for event in events.items:
                self.wfile.write(events.encode(event) if event is not None else
                                 b": still here\n\n")
                self.wfile.flush()
        except OSError:
            pass
        except Exception as e:  # the answer has begun: the stream ends (a client reconnects)
            if not isinstance(e, StoreUnavailable):
                log(f"internal error in the stream of {self.path}:\n{traceback.format_exc()}")
        finally:
            events.items.close()

    def read_body(self, limit):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length; "
                                                        "chunked transfer encoding is not "
                                                        "supported")
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is "
                                                        "required") from None
        if length > limit:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is {length} bytes; "
                                                                 f"at most {limit} are accepted")
        raw = self.rfile.read(length)
        self.unread = False
        if len(raw) < length:
            raise ConnectionError("client closed the connection mid-body")
        return raw

    # -- the original API ---------------------------------------------------------------

    @route("POST", "/transcription/job", "Create a job", {
        HTTPStatus.CREATED: _answer("Created", _ref("Job"), headers={"Location": {
            "schema": _STRING, "description": "/transcription/job/{id}"}})},
        errors=(*BODY, HTTPStatus.FORBIDDEN, *TAKE), requestBody={"required": True, "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["path"], "additionalProperties": False,
                "properties": {f.name: _request_field(f) for f in OPTIONS}}}}})
    def post_job(self):
        try:
            body = json.loads(self.read_body(MAX_BODY))
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {e}") from None
        job = self.service.submit(body)
        return HTTPStatus.CREATED, job, {"Location": f"/transcription/job/{job['id']}"}

    @route("GET", "/transcription/job/{id}", "A job", {
        HTTPStatus.OK: _answer("The job", _ref("Job"))}, errors=(HTTPStatus.BAD_REQUEST, HTTPStatus.NOT_FOUND, *STORE),
        parameters=[_JOB_ID, {"name": "wait", "in": "query", "required": False,
                              "description": "Hold up to this many seconds (at most 60) "
                                             "until it finished",
                              "schema": {"type": "number", "minimum": 0}}])
    def get_job(self, job_id):
        if "wait" in self.query:
            try:
                wait = float(self.query["wait"][-1])
                if not 0 <= wait < math.inf:
                    raise ValueError
            except ValueError:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "wait must be a number of seconds (at "
                                                        "most 60)", "wait") from None
            self.queue.wait(job_id, min(wait, MAX_WAIT))
        return HTTPStatus.OK, self.queue.show(job_id)

    @route("GET", "/transcription/job/{id}/events", "A job's events as they happen", {
        HTTPStatus.OK: {"description": "Server-Sent Events, each with an id: status, segment "
                        "(as soon as it is decoded; a finished job's, all), progress, and "
                        "last end (the job as GET answers it); comments while nothing "
                        "happens", "content": {"text/event-stream": {"schema": _STRING}}},
        HTTPStatus.NO_CONTENT: _answer("Last-Event-ID was the end's: nothing more will "
                                       "come (an EventSource stops reconnecting)")},
        errors=(HTTPStatus.NOT_FOUND, *STORE), parameters=[_JOB_ID, {
            "name": "Last-Event-ID", "in": "header", "required": False, "schema": _STRING,
            "description": "the id of the last event received: only what came after it "
                           "is sent"}])
    def job_events(self, job_id):
        since = self.headers.get("Last-Event-ID", "").strip()
        if since == "end":
            self.queue.show(job_id)  # 404 for no such job
            return HTTPStatus.NO_CONTENT, ""
        return HTTPStatus.OK, EventStream(_started_stream(self.queue.events(job_id, since)),
                                          _sse)

    @route("DELETE", "/transcription/job/{id}", "Delete a QUEUED job", {
        HTTPStatus.OK: _answer("The job as it was, and deleted: true", {"allOf": [
            _ref("Job"), {"type": "object", "required": ["deleted"],
                          "properties": {"deleted": {"const": True}}}]})},
        errors=(HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT, *TAKE), parameters=[_JOB_ID])
    def delete_job(self, job_id):
        return HTTPStatus.OK, {**self.service.delete(job_id), "deleted": True}

    @route("POST", "/transcription/job/{id}/cancel", "Cancel a QUEUED or RUNNING job", {
        HTTPStatus.OK: _answer("It was QUEUED: now FAILED, its callback sent", _ref("Job")),
        HTTPStatus.ACCEPTED: _answer("It runs: its runner stops it at its next step, and "
                                     "it ends FAILED", _ref("Job"))},
        errors=(HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT, *TAKE), parameters=[_JOB_ID])
    def cancel_job(self, job_id):
        job, ended = self.service.cancel(job_id)
        return HTTPStatus.OK if ended else HTTPStatus.ACCEPTED, job

    @route("GET", "/transcription/jobs", "Queued and running jobs and the last --history "
           "finished ones", {HTTPStatus.OK: _answer("Oldest first", {"type": "array",
                                                                     "items": _ref("Job")})},
           errors=STORE)
    def list_jobs(self):
        return HTTPStatus.OK, self.queue.listing()

    @route("GET", "/smi", "nvidia-smi's output, for a person", {
        HTTPStatus.OK: _answer("nvidia-smi's text", text=True),
        HTTPStatus.SERVICE_UNAVAILABLE: _answer("No nvidia-smi, or it failed", text=True)})
    def smi(self):
        unavailable = HTTPStatus.SERVICE_UNAVAILABLE
        try:
            done = subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                  timeout=SMI_TIMEOUT, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return unavailable, "nvidia-smi is not installed on this host (no NVIDIA driver?)\n"
        except subprocess.TimeoutExpired:
            return unavailable, f"nvidia-smi did not answer within {SMI_TIMEOUT:.0f} s\n"
        except OSError as e:
            return unavailable, f"nvidia-smi could not run: {e}\n"
        if done.returncode != 0:
            return unavailable, (f"nvidia-smi failed (exit {done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}")
        return HTTPStatus.OK, done.stdout

    @route("GET", "/stats", "Counts", {HTTPStatus.OK: _answer("Counts", {
        "type": "object", "properties": _COUNTS, "required": list(_COUNTS)})}, errors=STORE)
    def stats(self):
        return HTTPStatus.OK, self.queue.stats()

    # -- OpenAI's audio API -------------------------------------------------------------

    @route("POST", "/v1/audio/transcriptions", "OpenAI-compatible", **_AUDIO)
    @route("POST", "/v1/audio/translations", "OpenAI-compatible", **_AUDIO)
    def openai_audio(self):
        """OpenAI's `audio.transcriptions.create` and `audio.translations.create`, answered
        when done: the upload becomes an ordinary job in the same queue, and the answer
        comes from its result in memory."""
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "send the body as multipart/form-data, as "
                                                    "OpenAI's clients do")
        form = read_form(content_type, self.read_body(int(self.server.settings.max_upload
                                                              * 1024 * 1024)))
        upload = form.get("file")
        if not isinstance(upload, tuple):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "send the audio as a multipart file field "
                                                    "named 'file'", "file")
        response_format = form.get("response_format") or "json"
        if response_format not in OPENAI_FORMATS:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"response_format {response_format!r} is "
                            f"not supported; valid values: {', '.join(OPENAI_FORMATS)}",
                            "response_format")
        granularities, names, references = ([x] if isinstance(x, str) else x for x in (
            form.get(key, []) for key in ("timestamp_granularities[]", "known_speaker_names[]",
                                          "known_speaker_references[]")))
        for value in granularities:
            if value not in ("word", "segment"):
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"timestamp_granularities[] {value!r} "
                                f"is not supported; valid values: word, segment",
                                "timestamp_granularities[]")
        try:
            temperature = float(form.get("temperature") or 0)
        except (TypeError, ValueError):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "temperature must be a number from 0 to 1",
                            "temperature") from None
        model = form.get("model") if isinstance(form.get("model"), str) else ""
        stream = form.get("stream") in ("true", "True", "1")
        if stream and response_format not in ("json", "text", "diarized_json"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"stream=true answers text as it is "
                            f"decoded (transcript.text.delta events): response_format must "
                            f"be json, text or diarized_json, not {response_format}", "stream")
        diarize = model == DIARIZE_MODEL or response_format == "diarized_json"
        if diarize and response_format not in ("diarized_json", "json", "text"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"{DIARIZE_MODEL} answers json, text or "
                            f"diarized_json, not {response_format}", "response_format")
        if (names or references) and not diarize:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"known_speaker_names[] need model="
                            f"{DIARIZE_MODEL} or response_format=diarized_json",
                            "known_speaker_names[]")
        fields = {
            "model": "" if model.startswith(("whisper-", "gpt-")) else model,
            "language": form.get("language") or None, "initial_prompt": form.get("prompt"),
            "task": "translate" if self.path.startswith("/v1/audio/translations")
            else "transcribe",
            "word_timestamps": "word" in granularities, "temperature": temperature,
            "drop_suspect": form.get("drop_suspect") in ("true", "1"),  # whisperd's own
            "diarize": diarize, "speaker_names": names or None}
        if references:
            fields["speaker_references"] = [_data_url(reference, i)
                                            for i, reference in enumerate(references)]
        if stream:
            events = _started_stream(self.service.follow_upload(upload, fields))
            return HTTPStatus.OK, EventStream(openai_stream(events, response_format),
                                              _openai_sse)
        with self.service.uploaded(upload, fields) as (_, done):
            result, job = done.result()
        body, content_type = openai_answer(result, job, response_format)
        return HTTPStatus.OK, body, {"content_type": content_type} if content_type else {}

    # -- for people and operators -------------------------------------------------------

    @route("GET", "/", "The page", {HTTPStatus.OK: _answer("HTML")}, public=True,
           document=False)
    def show_page(self):
        auth, health, jobs = self.auth(), None, []
        if auth == "ok":
            health = self.status.health()
            try:
                jobs = self.queue.listing()
            except StoreUnavailable as e:
                health["store_error"] = health["store_error"] or str(e)
        return HTTPStatus.OK, page(health, jobs, auth, bool(self.server.settings.store)), {
            "content_type": "text/html; charset=utf-8", "Cache-Control": "no-store"}

    @route("GET", "/models", "Every model name a job may ask for", {
        HTTPStatus.OK: _answer("Each with its state", {"type": "array", "items": {
            "type": "object", "required": ["name", "state"], "properties": {
                "name": _STRING, "state": {"enum": MODEL_STATES},
                "path": {"type": ["string", "null"]},
                "loaded_on": {"type": "array", "items": _STRING}}}})})
    def models(self):
        return HTTPStatus.OK, self.status.models()

    @route("GET", "/health", "Liveness, the workers and what is loaded", {
        HTTPStatus.OK: _answer("Serving", _ref("Health")),
        HTTPStatus.SERVICE_UNAVAILABLE: _answer("Shutting down, or the job store unreachable",
                                                _ref("Health"))})
    def health(self):
        body = self.status.health()
        return HTTPStatus.OK if body["status"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE, body

    @route("GET", "/metrics", "Prometheus metrics", {
        HTTPStatus.OK: _answer("Prometheus text format", text=True)}, errors=STORE)
    def metrics(self):
        return HTTPStatus.OK, self.status.metrics(), \
            {"content_type": "text/plain; version=0.0.4; charset=utf-8"}

    @route("GET", "/openapi.json", "This document", {
        HTTPStatus.OK: _answer("OpenAPI 3.1", {"type": "object"})})
    def openapi(self):
        return HTTPStatus.OK, OPENAPI

    # -- quiet under abuse --------------------------------------------------------------

    LIMITS = {  # the stdlib's own refusals, said so that a person knows what to change
        "Line too long": "a header line is longer than 65536 bytes, the limit",
        "Too many headers": "more than 100 headers were sent; 100 is the limit",
        "Request-URI Too Long": "the request line is longer than 65536 bytes, the limit",
    }

    def send_error(self, code, message=None, explain=None):
        # The stdlib's own errors (bad request line, headers too long...) as JSON too.
        self.close_connection = True
        message = self.LIMITS.get(message, message) or HTTPStatus(code).phrase
        self.respond(code, {"error": message if len(message) < 200 else message[:200] + "..."})

    def log_message(self, format, *args):
        pass  # no access log: a job's events are logged, requests are not

    def log_error(self, format, *args):
        message = format % args
        if "timed out" not in message:
            log(f"client {self.client_address[0]}: {message}"[:200])


def _routes():
    """{path: {method: (answer, its declaration)}} from the @route methods, and the same
    for the paths with parameters: [(pattern, {method: ...})]."""
    plain, patterns = {}, {}
    for answer in vars(Handler).values():
        for r in getattr(answer, "routes", ()):
            table, key = (patterns, r.pattern) if "{" in r.path else (plain, r.path)
            table.setdefault(key, {})[r.method] = answer, r
    return plain, list(patterns.items())


ROUTES, PATTERN_ROUTES = _routes()
OPENAPI = openapi_document(r for table in (ROUTES.values(), dict(PATTERN_ROUTES).values())
                           for methods in table for _, r in methods.values())


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer, bound to the service, quiet about clients that go away."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, settings):
        self.settings, self.service = settings, None  # serve() gives it its service
        self.answering, self.quiet = 0, threading.Condition()  # requests being answered
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        super().__init__((settings.host, settings.port), Handler)

    def drain(self, seconds):
        """Waits, at most `seconds`, for the answers on their way: a GET ?wait= that its
        job's end (at shutdown) woke is answered before whisperd leaves."""
        with self.quiet:
            self.quiet.wait_for(lambda: not self.answering, seconds)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # resets, broken pipes, timeouts: one short line
            log(f"client {client_address[0]}: {type(error).__name__}: {error}"[:200])
        else:
            super().handle_error(request, client_address)


# ---------------------------------------------------------------------------------------
# Client: whisperd submit | status | jobs | cancel | follow
# ---------------------------------------------------------------------------------------

CLIENT_COMMANDS = ("submit", "status", "jobs", "cancel", "follow")


class Client:
    """Talks to a running whisperd at $WHISPERD_URL with $WHISPERD_TOKEN."""

    def __init__(self):
        self.url = os.environ.get("WHISPERD_URL", "http://127.0.0.1:9000").rstrip("/")
        token = os.environ.get("WHISPERD_TOKEN")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method, path, body=None):
        """Returns (status, JSON answer); exits with status 2 when whisperd is unreachable."""
        request = urllib.request.Request(self.url + path, method=method, headers={
                                         "Content-Type": "application/json", **self.auth},
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
            print(f"whisperd: cannot reach {self.url}: {getattr(e, 'reason', e)}",
                  file=sys.stderr)
            sys.exit(2)

    REACH = 300  # seconds a stream is sought again after its connection broke

    def events(self, job_id):
        """The job's events (GET /transcription/job/ID/events) as (kind, JSON), up to its
        end. A connection that breaks (whisperd restarted) is made again, from the last
        event received (Last-Event-ID), for up to REACH seconds; then it exits 2 saying
        why, as call() does (an answer that is not a stream, an unknown job: 1)."""
        last, lost = "", None
        while True:
            request = urllib.request.Request(f"{self.url}/transcription/job/{job_id}/events",
                                             headers={"Accept": "text/event-stream",
                                                      "Last-Event-ID": last, **self.auth})
            try:
                with urllib.request.urlopen(request, timeout=4 * JobQueue.KEEPALIVE) as answer:
                    lost, event = None, {}
                    for line in answer:
                        line = line.decode().rstrip("\r\n")
                        if line:
                            name, _, value = line.partition(": ")
                            event[name] = value
                            continue
                        if "data" in event:
                            last = event.get("id", last)
                            yield event.get("event"), json.loads(event["data"])
                            if event.get("event") == "end":
                                return
                        event = {}
            except urllib.error.HTTPError as e:
                try:
                    said = json.load(e)["error"]
                except ValueError:
                    said = f"HTTP {e.code}"
                sys.exit(f"whisperd: {said}")
            except (urllib.error.URLError, OSError) as e:
                lost = lost or time.monotonic()
                if time.monotonic() - lost > self.REACH:
                    print(f"whisperd: cannot reach {self.url}: {getattr(e, 'reason', e)}",
                          file=sys.stderr)
                    sys.exit(2)
            time.sleep(1.0)


def _option_flag(parser, f):
    """A `whisperd submit` flag for a job option, from its declaration."""
    schema, help = f.metadata["schema"], f.metadata["help"]
    kind = schema["type"][0] if isinstance(schema["type"], list) else schema["type"]
    flag = "--" + f.name.replace("_", "-")
    default = "" if f.default in (None, "") else f" (default: {str(f.default).lower()})"
    words = [value for value in schema.get("enum", ()) if isinstance(value, str)]
    if kind == "boolean" and words:  # --diarize, or --diarize channels
        more = dict(nargs="?", const=True, choices=[True, False, *words], metavar="|".join(words),
                    type=lambda value: {"true": True, "false": False}.get(value, value))
    elif kind == "boolean":
        more = dict(action=argparse.BooleanOptionalAction)
    elif kind == "array":  # no default to say: theirs is None
        more = dict(nargs="+", metavar=f.name.upper().removesuffix("S"))
    else:
        more = dict(type={"integer": int, "number": float}.get(kind, str),
                    choices=schema.get("enum"),
                    metavar=None if "enum" in schema else f.name.upper())
    parser.add_argument(flag, default=None, help=help + default, **more)


def client_main(argv):
    parser = argparse.ArgumentParser(
        prog="whisperd", description="Talk to a running whisperd ($WHISPERD_URL, default "
                                     "http://127.0.0.1:9000; $WHISPERD_TOKEN).")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser(
        "submit", help="queue audio files; print their job ids (or, with --wait, what they "
                       "made)",
        description="Queues each FILE as a job, with the options given (omitted: the "
                    "daemon's defaults). Exit status: 0 when every job was accepted (and, with "
                    "--wait, completed), 1 when one FAILED, 2 when one was refused.")
    submit.add_argument("files", nargs="+", metavar="FILE",
                        help="audio files on the whisperd host (relative paths are taken "
                             "from here)")
    for f in OPTIONS:
        if f.name != "path":
            _option_flag(submit, f)
    submit.add_argument("--wait", action="store_true",
                        help="wait for the jobs, with a progress bar each on a terminal; "
                             "print the transcripts (txt) or where the files went")
    submit.add_argument("--follow", action="store_true",
                        help="print each segment as it is decoded, with its times (one "
                             "job after the other), and a progress bar on a terminal")
    commands.add_parser("status", help="one job, as JSON").add_argument("id")
    commands.add_parser("follow", help="print a job's segments as they are decoded (a "
                                       "finished job's, all), with their times; exit 1 if it "
                                       "FAILED").add_argument("id")
    commands.add_parser("jobs", help="the queued, running and recently finished jobs")
    commands.add_parser("cancel", help="stop jobs: a queued one ends now, a running one at "
                                       "its next step (both FAILED)").add_argument(
        "ids", nargs="+", metavar="ID")
    args = parser.parse_args(argv)
    client = Client()

    if args.command == "cancel":
        exit_status = 0
        for job_id in args.ids:
            status, job = client.call("POST", f"/transcription/job/{job_id}/cancel")
            if status not in (HTTPStatus.OK, HTTPStatus.ACCEPTED):
                print(f"whisperd: {job['error']}", file=sys.stderr)
                exit_status = 1
            else:
                print(f"{job_id}  " + ("cancelled: FAILED" if status == HTTPStatus.OK else
                                       "cancelled: it stops at its next step"))
        return exit_status
    if args.command == "follow":  # Ctrl-C: main() answers 130
        return follow(client, args.id)
    if args.command == "status":
        status, job = client.call("GET", f"/transcription/job/{args.id}")
        if status != HTTPStatus.OK:
            sys.exit(f"whisperd: {job['error']}")
        print(json.dumps(job, indent=2, ensure_ascii=False))
        return 1 if job["status"] == FAILED else 0
    if args.command == "jobs":
        status, jobs = client.call("GET", "/transcription/jobs")
        if status != HTTPStatus.OK:
            sys.exit(f"whisperd: {jobs['error']}")
        for job in jobs:
            print(f"{job['id']}  {job['status']:<9} {job['progress']:>3}%  {job['path']}")
        return 0

    jobs, exit_status = [], 0
    options = {f.name: getattr(args, f.name) for f in OPTIONS
               if f.name != "path" and getattr(args, f.name) is not None}
    if options.get("output_path"):
        options["output_path"] = os.path.abspath(options["output_path"])
    if options.get("speaker_references"):
        options["speaker_references"] = [os.path.abspath(path) for path in
                                          options["speaker_references"]]
    try:
        for file in args.files:
            with _interrupt_after():  # a job whisperd made is a job the client names
                status, job = client.call("POST", "/transcription/job",
                                          {"path": os.path.abspath(file), **options})
                if status == HTTPStatus.CREATED:
                    jobs.append(job)
            if status != HTTPStatus.CREATED:
                print(f"whisperd: {file}: {job['error']}", file=sys.stderr)
                exit_status = 2
            elif not (args.wait or args.follow):
                print(job["id"])
        for i, job in enumerate(jobs if args.follow else ()):
            if len(jobs) > 1:  # which is which, as head(1) says it of several files
                print(f"{chr(10) if i else ''}==> {job['path']} <==", flush=True)
            exit_status = max(exit_status, follow(client, job["id"]))
        if args.wait and jobs and not args.follow:
            exit_status = max(exit_status, watch(client, jobs))
    except KeyboardInterrupt:  # Ctrl-C stops the client, not the jobs
        if jobs:
            print("\nwhisperd: stopped; the jobs go on in whisperd. Follow one with "
                  "`whisperd status ID`, stop it with `whisperd cancel ID`:\n" + "".join(
                      f"  {job['id']}  {job['path']}\n" for job in jobs), end="",
                  file=sys.stderr)
        return 130
    return exit_status


@contextlib.contextmanager
def _interrupt_after():
    """Holds Ctrl-C (SIGINT) back until the block is done, then raises it: a submission
    whisperd answered is recorded before the client stops (the request has its timeout)."""
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def follow(client, job_id):
    """Prints the job's segments as they come, as `whisper --verbose` prints them
    ([start --> end] text), with a progress bar on a terminal; 1 if it FAILED."""
    stamp = whisper_part("utils").format_timestamp
    bar = None
    if sys.stderr.isatty():
        import tqdm
        bar = tqdm.tqdm(total=100, ncols=shutil.get_terminal_size().columns,
                        bar_format="{desc} {percentage:3.0f}%|{bar}|")
    try:
        for kind, data in client.events(job_id):
            if kind == "segment":
                said = f" {data['speaker']}:" if "speaker" in data else ""  # a replay
                line = f"[{stamp(data['start'])} --> {stamp(data['end'])}]{said} {data['text']}"
                if bar is not None:
                    bar.write(line, file=sys.stdout)
                else:
                    print(line, flush=True)
            elif bar is not None and kind in ("progress", "status", "end"):
                bar.n = data.get("progress", bar.n)
                bar.set_description_str(data.get("status", "").lower() or bar.desc)
            if kind == "end":
                job = data
    finally:
        if bar is not None:
            bar.close()
    if job["status"] == FAILED:
        print(f"whisperd: {job['path']}: FAILED: {job['error']}", file=sys.stderr)
        return 1
    return 0


def watch(client, jobs):
    """Waits for the jobs, a progress bar each on a terminal from the start (the queue
    position while queued); prints what they made."""
    bars = {}
    if sys.stderr.isatty():
        import tqdm
        width = shutil.get_terminal_size().columns  # tqdm draws nothing on a 0-wide tty
        for i, job in enumerate(jobs):
            bars[job["id"]] = tqdm.tqdm(total=100, position=i, ncols=width,
                                        bar_format="{desc} {percentage:3.0f}%|{bar}|")
    pending = {job["id"]: job for job in jobs}
    while pending:
        for job_id in list(pending):
            status, job = client.call("GET", f"/transcription/job/{job_id}"
                                             + ("" if bars else "?wait=30"))
            if status != HTTPStatus.OK:
                job = dict(pending[job_id], status=FAILED, error=job["error"])
            if job_id in bars:
                state = f"queued #{job['position']}" if job["position"] else job["status"].lower()
                bars[job_id].n = job["progress"]
                bars[job_id].set_description_str(
                    f"{os.path.basename(job['path'])}: {state:<10}")  # refreshes it
            if job["status"] in FINISHED:
                pending.pop(job_id)
                jobs[[j["id"] for j in jobs].index(job_id)] = job
        if pending and bars:
            time.sleep(0.25)
    for bar in bars.values():
        bar.close()
    failed = 0
    for i, job in enumerate(jobs):
        if job["status"] == FAILED:
            failed = 1
            print(f"whisperd: {job['path']}: FAILED: {job['error']}", file=sys.stderr)
            continue
        if len(jobs) > 1:  # which is which, as head(1) says it of several files
            print(f"{chr(10) if i else ''}==> {job['path']} <==")
        if job["format"] == "txt":
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
    """Binds, announces, waits for SIGTERM or SIGINT, stops the service, exits 0."""
    # numpy's OpenBLAS (read when numpy is first imported, in a worker) keeps a thread per
    # core spinning for a while after each product, and every file's or window's features
    # take one: on 2 cores that thread took 9% of the CPU from the model's (bench/RESULTS.md).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    lock = lock_state_dir(settings.state_dir)
    try:
        server = Server(settings)
    except OSError as e:
        sys.exit(f"whisperd: cannot listen on {settings.host}:{settings.port}: {e.strerror}")
    host, port = server.server_address[:2]
    node = settings.node or f"{socket.gethostname()}:{port}"
    try:
        server.service = service = Service(settings, node, f"http://{host}:{port}")
    except StoreRefused as e:
        sys.exit(f"whisperd: --store {_redact(settings.store)}: {e}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    store = _redact(settings.store) if settings.store else settings.state_dir
    log(f"listening on http://{host}:{port} (node {node}, engine {settings.engine}, workers "
        f"{', '.join(settings.devices)}, store {store}, models {settings.model_dir})")
    engine = ENGINES[settings.engine]
    if not engine.on_disk(settings.model_dir, settings.default_model):
        log(f"the default model {settings.default_model} is not in {settings.model_dir}: it "
            f"is downloaded there when a job first needs it (--default-model picks another;"
            f" on disk: {', '.join(engine.local(settings.model_dir)) or 'none'})")
    service.start()
    sd_notify("READY=1")
    while not stop.wait(1.0):  # the signal's handler runs between two waits
        pass
    sd_notify("STOPPING=1")
    clean = service.stop(settings.shutdown_grace)
    server.shutdown()
    server.drain(2.0)
    server.server_close()
    lock.close()
    log("stopped" if clean else "stopped, leaving a worker stuck in native code")
    # Everything is on disk. The interpreter's own exit would tear torch's and ffmpeg's
    # threads down under the daemon threads still parked (or a stuck worker), which was
    # seen to abort once in the tests (SIGABRT after a clean stop): leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CLIENT_COMMANDS:
        try:
            return client_main(argv)
        except BrokenPipeError:  # `whisperd status ID | head`
            sys.stderr.close()
            return 0
        except KeyboardInterrupt:
            return 130
    return serve(parse_settings(argv))


if __name__ == "__main__":
    sys.exit(main())
