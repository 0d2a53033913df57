#!/usr/bin/env python3
"""Transcription speed, memory and accuracy of whisperd against the `whisper` CLI and the
bare libraries, on the same spoken audio, in one run.

What it does
  1. Speaks a set of plain-English files with espeak-ng (cached in bench/out/audio): by
     default a dozen files of 10 to 60 s plus one of about 4 minutes, and ten files of
     about 10 s for the "many short files" case. The spoken text is the reference.
  2. Transcribes them, with the `whisper` command line's decoding settings everywhere
     (beam 5, best of 5, temperature fallback 0.0..1.0; fp16 off on a CPU, on on a GPU),
     on --device (cpu by default), through:
       a   cli          the `whisper` command, one fresh process per file
       b   bare-ow      openai-whisper in a warm process (the model loaded once)
       c   whisperd-ow  whisperd, openai-whisper engine (submit all, wait all)
       -   bare-fw      faster-whisper int8 in a warm process (reference for d/e)
       d   whisperd-fw-int8, whisperd-fw-float32   whisperd --engine faster-whisper
       e   whisperd-fw-batch8                      ... --batch-size 8 (batched pipeline + VAD)
       (+) bare-fw-batch8   faster-whisper's BatchedInferencePipeline (asked for on a CPU)
     On a GPU (--device cuda) faster-whisper runs float16 (its default there) instead of
     int8, and int8_float16 instead of float32: bare-fw-float16, whisperd-fw-float16,
     whisperd-fw-int8_float16, whisperd-fw-batch8 (float16), bare-fw-batch8.
     Each daemon and each bare process first transcribes a short warm-up file (model load),
     which is not counted. bare-ow and whisperd-ow also run "paired": for each file the
     bare library and one whisperd job (submit, wait) run back to back, so their ratio is
     measured under the same machine conditions.
  3. Prints one table row per variant: audio seconds per wall second, speed relative to
     bare-ow (b), peak resident memory of the process doing the work (VmHWM of a daemon or
     bare process; for the CLI the largest ru_maxrss of its processes, from os.wait4), and
     the corpus word error rate against the spoken text (tools/harness.py's); on
     a GPU also the GPU memory the process holds at the end (nvidia-smi). Then
     the targets, each PASS or MISS:
       T1  a whisperd job (client-observed, submit to finished) / bare library, warm: <= 1.05
       T2  whisperd faster-whisper (int8 on a CPU) / whisperd openai-whisper: >= 1.5x, WER
           no worse by more than 0.02
       T3  ten ~10 s files in a row: CLI per file / whisperd (warm daemon): >= 3x
     Everything is also written as JSON (bench/out/transcribe.json).

Run (from the repository root, with the venv's python; 10 to 25 minutes on 2 cores):
  .venv/bin/python bench/transcribe.py                      # default sizes
  .venv/bin/python bench/transcribe.py --quick              # smoke run, about 2 minutes
  .venv/bin/python bench/transcribe.py --full               # the long file is 10 min (16 to 35 min)
  .venv/bin/python bench/transcribe.py --model-dir /tmp/models --variants cli,bare-ow,whisperd-ow
  python bench/transcribe.py --device cuda --no-wait        # on a GPU host
The model is Whisper tiny.en, made offline by tools/models.py in --model-dir (default
$WHISPERD_MODEL_DIR, else bench/out/models). Before measuring, the script waits while a
test suite (pytest, .ci/run) runs on the machine (--no-wait skips that).

Timings on a shared machine are noisy: compare the ratios of one run, not runs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CLI_DECODING, JOB_TIMEOUT, LOGPROB_THRESHOLD,  # noqa: E402
                     MODEL_DIR, OUT, PYTHON, CpuWatch, Daemon, audio_seconds,
                     ensure_models, gpu_mib, machine, make_set, peak_rss_mib, reference,
                     speak, wait_until_quiet, word_error_rate)

SIZES = {  # seconds of each file: (the set, the long file, the short files)
    "quick": ([10, 30, 60], None, [10] * 4),
    "default": ([10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 30], 240, [10] * 10),
    "full": ([10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 30], 600, [10] * 10),
}
# faster-whisper's variants: (name, compute type, batch size, bare library or whisperd).
# The first is the engine's default compute type on that device, which T2 judges.
FW_VARIANTS = {
    "cpu": (("bare-fw-int8", "int8", 0, True), ("whisperd-fw-int8", "int8", 0, False),
            ("whisperd-fw-float32", "float32", 0, False),
            ("whisperd-fw-batch8", "int8", 8, False), ("bare-fw-batch8", "int8", 8, True)),
    "cuda": (("bare-fw-float16", "float16", 0, True),
             ("whisperd-fw-float16", "float16", 0, False),
             ("whisperd-fw-int8_float16", "int8_float16", 0, False),
             ("whisperd-fw-batch8", "float16", 8, False),
             ("bare-fw-batch8", "float16", 8, True)),
}


def fw_variants(device):
    """FW_VARIANTS for `device` ("cpu" or "cuda[:N]")."""
    return FW_VARIANTS["cpu" if device == "cpu" else "cuda"]


def variants(device):
    """All variants on `device`, and those run by default."""
    names = ("bare-ow", "whisperd-ow", "cli") + tuple(v[0] for v in fw_variants(device))
    # on a CPU the bare batched pipeline is slow and adds nothing to the targets
    return names, names[:-1] if device == "cpu" else names


# ---------------------------------------------------------------------------------------
# A bare library in its own warm process (so its memory is its own)
# ---------------------------------------------------------------------------------------

def worker_main(kind, model_dir, compute_type, batch_size, device):
    """`--worker KIND`: loads the model, then per stdin line {"path", "out"} transcribes
    the file, writes its .txt like the CLI, and answers {"seconds", "text"} on stdout.
    At end of input answers {"peak_rss_mib"}."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the protocol
    started = time.monotonic()
    from whisper.utils import get_writer
    if kind == "ow":
        import whisper
        model = whisper.load_model(os.path.join(model_dir, "tiny.en.pt"), device=device)

        def transcribe(path):
            return whisper.transcribe(model, path, verbose=None, fp16=device != "cpu",
                                      language=None,
                                      task="transcribe", initial_prompt=None,
                                      word_timestamps=False,
                                      logprob_threshold=LOGPROB_THRESHOLD, **CLI_DECODING)
    else:
        import faster_whisper
        where, _, index = device.partition(":")
        model = faster_whisper.WhisperModel(os.path.join(model_dir, "tiny.en"), device=where,
                                            device_index=int(index or 0),
                                            compute_type=compute_type)
        options = dict(CLI_DECODING, log_prob_threshold=LOGPROB_THRESHOLD, language=None,
                       task="transcribe", initial_prompt=None, word_timestamps=False)
        if batch_size:
            model = faster_whisper.BatchedInferencePipeline(model)
            options["batch_size"] = batch_size

        def transcribe(path):
            pieces, info = model.transcribe(path, **options)
            segments = [{"start": p.start, "end": p.end, "text": p.text} for p in pieces]
            return {"text": "".join(s["text"] for s in segments), "segments": segments}
    print(json.dumps({"ready": time.monotonic() - started}), file=protocol)
    for line in sys.stdin:
        request = json.loads(line)
        started = time.monotonic()
        result = transcribe(request["path"])
        get_writer("txt", request["out"])(result, request["path"])
        seconds = time.monotonic() - started
        print(json.dumps({"seconds": seconds, "text": result["text"]}), file=protocol)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(os.getpid())}), file=protocol)


class Bare:
    """The parent's handle on a --worker process."""

    def __init__(self, kind, model_dir, device, compute_type="int8", batch_size=0):
        self.proc = subprocess.Popen(
            [PYTHON, __file__, "--worker", kind, "--model-dir", str(model_dir),
             "--device", device, "--compute-type", compute_type,
             "--batch-size", str(batch_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1)
        self.ready = self._answer()["ready"]

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bare worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def transcribe(self, path, out):
        self.proc.stdin.write(json.dumps({"path": str(path), "out": str(out)}) + "\n")
        return self._answer()

    def close(self):
        self.proc.stdin.close()
        peak = self._answer()["peak_rss_mib"]
        self.proc.wait()
        return peak


# ---------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, files, shorts, warm):
        self.args, self.files, self.shorts, self.warm = args, files, shorts, warm
        self.audio = {str(f): audio_seconds(f) for f in files + shorts}
        self.rows = {}      # variant -> row
        self.extra = {}     # paired and short-file measurements
        self.scratch = OUT / "scratch"
        shutil.rmtree(self.scratch, ignore_errors=True)

    def folder(self, name):
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def gpu_mib(self, pid):
        """GPU memory the live process `pid` holds; None on a CPU."""
        return gpu_mib(pid) if self.args.device != "cpu" else None

    def row(self, variant, files, wall, texts, peak, **more):
        audio = sum(self.audio[str(f)] for f in files)
        self.rows[variant] = {
            "files": len(files), "audio_s": round(audio, 1), "wall_s": round(wall, 2),
            "speed": audio / wall, "peak_rss_mib": round(peak),
            "wer": word_error_rate(*zip(map(reference, files), texts)), **more}
        r = self.rows[variant]
        print(f"  {variant:22} {r['audio_s']:7.1f} s audio in {r['wall_s']:7.2f} s: "
              f"{r['speed']:5.2f}x real time, peak {r['peak_rss_mib']} MiB, "
              f"WER {r['wer']:.3f}"
              + (f", GPU {r['gpu_mib']} MiB" if r.get("gpu_mib") else ""), flush=True)

    def daemon(self, name, flags=()):
        state = self.folder(f"state-{name}")
        daemon = Daemon(state, self.args.model_dir, "--max-queue", "100000",
                        "--device", self.args.device, *flags).start()
        started = time.monotonic()
        try:
            self.wait(daemon, self.submit(daemon, self.warm, self.folder("warm")))
        except BaseException:
            daemon.stop()
            raise
        daemon.warmup_s = time.monotonic() - started
        return daemon

    @staticmethod
    def submit(daemon, path, out):
        """Submits one job (a .txt into `out`); returns its id."""
        return daemon.submit(path=path, output_path=out, format="txt")["id"]

    @staticmethod
    def wait(daemon, job_id):
        """The job once COMPLETED (fails if it FAILED)."""
        return daemon.completed(job_id, timeout=JOB_TIMEOUT)

    def run_all(self, daemon, files, out):
        """Submit all, wait all: (wall from first submit to last finish, jobs)."""
        started = time.monotonic()
        ids = [self.submit(daemon, f, out) for f in files]
        jobs = [self.wait(daemon, i) for i in ids]
        return time.monotonic() - started, jobs

    def bare_pass(self, variant, bare, files):
        out = self.folder(variant)
        answers = [bare.transcribe(f, out) for f in files]
        return sum(a["seconds"] for a in answers), [a["text"] for a in answers]

    # -- b and c, and the short files through whisperd --------------------------------

    def openai_whisper(self, want):
        print("openai-whisper: bare library and whisperd", flush=True)
        daemon = self.daemon("ow")
        try:
            if {"bare-ow", "whisperd-ow"} & set(want):
                self.paired(daemon, want)
            if "whisperd-ow" in want:
                wall, jobs = self.run_all(daemon, self.files, self.folder("whisperd-ow"))
                self.row("whisperd-ow", self.files, wall, [j["result"] for j in jobs],
                         peak_rss_mib(daemon.proc.pid),
                         gpu_mib=self.gpu_mib(daemon.proc.pid),
                         duration_sum_s=round(sum(j["Duration"] for j in jobs), 2),
                         warmup_s=round(daemon.warmup_s, 2))
            if "cli" in want:  # the short files: the daemon that is already up ...
                wall, jobs = self.run_all(daemon, self.shorts, self.folder("shorts-whisperd"))
                self.extra["shorts_whisperd"] = {
                    "wall_s": wall, "wer": word_error_rate(*zip(
                        map(reference, self.shorts), (j["result"] for j in jobs)))}
                print(f"  {len(self.shorts)} short files, warm whisperd: {wall:.2f} s")
        finally:
            daemon.stop()
        if "cli" in want:  # ... and one started for them
            started = time.monotonic()
            cold = Daemon(self.folder("state-cold"), self.args.model_dir,
                          "--device", self.args.device).start()
            try:
                up = time.monotonic() - started
                self.run_all(cold, self.shorts, self.folder("shorts-cold"))
                self.extra["shorts_whisperd_cold"] = {"wall_s": time.monotonic() - started,
                                                      "port_s": up}
            finally:
                cold.stop()
            print(f"  {len(self.shorts)} short files, whisperd started for them: "
                  f"{self.extra['shorts_whisperd_cold']['wall_s']:.2f} s (port answered "
                  f"after {up:.2f} s)")

    def paired(self, daemon, want):
        """Per file, the bare library and one whisperd job (submit, wait) back to back,
        alternating which goes first, so that T1 compares like with like."""
        bare = Bare("ow", self.args.model_dir, self.args.device)
        bare.transcribe(self.warm, self.folder("warm"))
        out_b, out_c = self.folder("paired-bare-ow"), self.folder("paired-whisperd-ow")
        per_file, texts = [], []
        for i, f in enumerate(self.files):
            for step in (("bare", "job") if i % 2 == 0 else ("job", "bare")):
                if step == "bare":
                    answer = bare.transcribe(f, out_b)
                    bare_s = answer["seconds"]
                    texts.append(answer["text"])
                else:
                    started = time.monotonic()
                    job = self.wait(daemon, self.submit(daemon, f, out_c))
                    job_s, duration = time.monotonic() - started, job["Duration"]
            per_file.append({"file": Path(f).name, "audio_s": self.audio[str(f)],
                             "bare_s": bare_s, "job_s": job_s, "Duration": duration})
        p = self.extra["paired"] = {
            "bare_s": sum(r["bare_s"] for r in per_file),
            "whisperd_job_s": sum(r["job_s"] for r in per_file),
            "whisperd_duration_s": sum(r["Duration"] for r in per_file),
            "per_file": per_file}
        print(f"  paired: bare {p['bare_s']:.2f} s, whisperd jobs {p['whisperd_job_s']:.2f} s "
              f"(their Duration {p['whisperd_duration_s']:.2f} s)")
        gpu = self.gpu_mib(bare.proc.pid)  # while it is alive
        peak = bare.close()
        if "bare-ow" in want:
            self.row("bare-ow", self.files, p["bare_s"], texts, peak, gpu_mib=gpu,
                     load_s=round(bare.ready, 2), note="the paired pass")

    # -- a ------------------------------------------------------------------------------

    def cli(self, files, out):
        """The `whisper` command, one process per file; (wall, texts, peak MiB)."""
        model = os.path.join(self.args.model_dir, "tiny.en.pt")
        texts, peak, log = [], 0, self.scratch / "cli.log"
        started = time.monotonic()
        for f in files:
            with open(log, "w") as errors:
                proc = subprocess.Popen(
                    [PYTHON, "-m", "whisper", str(f), "--model", model,
                     "--device", self.args.device, "--fp16", str(self.args.device != "cpu"),
                     "--output_format", "txt", "--output_dir", str(out)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise RuntimeError(f"whisper CLI failed on {f}:\n{log.read_text()}")
            peak = max(peak, usage.ru_maxrss / 1024)  # KiB on Linux
            texts.append((out / (Path(f).stem + ".txt")).read_text())
        return time.monotonic() - started, texts, peak

    def command_line(self):
        print("whisper CLI, one process per file", flush=True)
        wall, texts, peak = self.cli(self.files, self.folder("cli"))
        self.row("cli", self.files, wall, texts, peak)
        wall, texts, _ = self.cli(self.shorts, self.folder("shorts-cli"))
        self.extra["shorts_cli"] = {"wall_s": wall, "wer": word_error_rate(
            *zip(map(reference, self.shorts), texts))}
        print(f"  {len(self.shorts)} short files, CLI: {wall:.2f} s")

    # -- d and e ------------------------------------------------------------------------

    def faster_whisper(self, want):
        print("faster-whisper: bare library and whisperd", flush=True)
        fw = fw_variants(self.args.device)
        for variant, compute, batch, bare in fw:
            if variant in want and bare:
                bare = Bare("fw", self.args.model_dir, self.args.device, compute, batch)
                bare.transcribe(self.warm, self.folder("warm"))
                seconds, texts = self.bare_pass(variant, bare, self.files)
                gpu = self.gpu_mib(bare.proc.pid)  # while it is alive
                self.row(variant, self.files, seconds, texts, bare.close(), gpu_mib=gpu,
                         load_s=round(bare.ready, 2))
        for variant, compute, batch, bare in fw:
            if variant in want and not bare:
                flags = ["--engine", "faster-whisper", "--compute-type", compute]
                daemon = self.daemon(variant, flags + (["--batch-size", str(batch)]
                                                       if batch else []))
                try:
                    wall, jobs = self.run_all(daemon, self.files, self.folder(variant))
                    self.row(variant, self.files, wall, [j["result"] for j in jobs],
                             peak_rss_mib(daemon.proc.pid),
                             gpu_mib=self.gpu_mib(daemon.proc.pid),
                             duration_sum_s=round(sum(j["Duration"] for j in jobs), 2),
                             warmup_s=round(daemon.warmup_s, 2))
                    if variant == fw[1][0] and "cli" in want:
                        wall, _ = self.run_all(daemon, self.shorts,
                                               self.folder("shorts-whisperd-fw"))
                        self.extra["shorts_whisperd_fw"] = {"wall_s": wall,
                                                            "variant": variant}
                        print(f"  {len(self.shorts)} short files, warm {variant}: "
                              f"{wall:.2f} s")
                finally:
                    daemon.stop()


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def report(bench, sizes):
    rows, extra, device = bench.rows, bench.extra, bench.args.device
    fw_default = fw_variants(device)[1][0]
    base = rows.get("bare-ow")
    gpu = device != "cpu"
    print("\n| variant | files | audio s | wall s | audio s / wall s | vs bare-ow (b) "
          "| peak RSS MiB |" + (" GPU MiB |" if gpu else "") + " WER |")
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|")
    for name in variants(device)[0]:
        if name in rows:
            r = rows[name]
            ratio = f"{r['speed'] / base['speed']:.2f}" if base else "-"
            print(f"| {name} | {r['files']} | {r['audio_s']:.1f} | {r['wall_s']:.2f} | "
                  f"{r['speed']:.2f} | {ratio} | {r['peak_rss_mib']} | "
                  + (f"{r.get('gpu_mib') or '-'} | " if gpu else "") + f"{r['wer']:.3f} |")
    targets = []

    def target(name, value, ok, text):
        targets.append({"target": name, "value": value, "pass": ok, "text": text})
        print(f"{'PASS' if ok else 'MISS'}  {name}: {text}")

    print()
    if "paired" in extra:
        p = extra["paired"]
        ratio = p["whisperd_job_s"] / p["bare_s"]
        target("T1 whisperd job / bare library (warm, paired) <= 1.05", ratio, ratio <= 1.05,
               f"{ratio:.3f} (jobs {p['whisperd_job_s']:.2f} s as the client saw them, "
               f"Duration {p['whisperd_duration_s']:.2f} s = "
               f"{p['whisperd_duration_s'] / p['bare_s']:.3f}, bare {p['bare_s']:.2f} s)")
    if "whisperd-ow" in rows and fw_default in rows:
        ow, fw = rows["whisperd-ow"], rows[fw_default]
        speedup, worse = fw["speed"] / ow["speed"], fw["wer"] - ow["wer"]
        target(f"T2 {fw_default} / whisperd-ow >= 1.5x, WER +<= 0.02",
               speedup, speedup >= 1.5 and worse <= 0.02,
               f"{speedup:.2f}x, WER {fw['wer']:.3f} vs {ow['wer']:.3f} ({worse:+.3f})")
    if "shorts_cli" in extra and "shorts_whisperd" in extra:
        cli, warm = extra["shorts_cli"]["wall_s"], extra["shorts_whisperd"]["wall_s"]
        cold = extra.get("shorts_whisperd_cold", {}).get("wall_s")
        n = len(bench.shorts)
        each = sum(bench.audio[str(f)] for f in bench.shorts) / n
        target(f"T3 {n} files of {each:.1f} s: CLI per file / whisperd >= 3x", cli / warm,
               cli / warm >= 3,
               f"{cli / warm:.2f}x (CLI {cli:.2f} s, warm whisperd {warm:.2f} s"
               + (f"; whisperd started for them {cold:.2f} s: {cli / cold:.2f}x)"
                  if cold else ")"))
        fw = extra.get("shorts_whisperd_fw", {}).get("wall_s")
        if fw:
            print(f"      (for comparison, not judged: {fw_default} {fw:.2f} s: "
                  f"{cli / fw:.2f}x)")
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "sizes": sizes,
              "device": device, "machine": machine(),
              "audio_s": sum(bench.audio[str(f)] for f in bench.files),
              "rows": rows, "extra": extra, "targets": targets}
    return result


def spoken(audio, lengths, long, shorts):
    """The set's files, the short files and the warm-up file, spoken into `audio` (an
    absolute path: whisperd wants them) unless they are there; bench/device/prepare.sh
    speaks them here for a GPU machine without espeak-ng."""
    files = make_set(audio, lengths, "set") + (make_set(audio, [long], "long") if long else [])
    short_files = make_set(audio, shorts, "short")
    warm = audio / "warmup.wav"
    if not warm.exists():
        speak("Thank you for calling. Please call me back tomorrow morning.", warm)
    return files, short_files, warm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="three files, four short ones")
    size.add_argument("--full", action="store_true", help="the long file is 10 minutes")
    parser.add_argument("--model-dir", default=MODEL_DIR,
                        help="where tiny.en.pt and tiny.en/ are (made if missing)")
    parser.add_argument("--audio-dir", default=str(OUT / "audio"), help="audio cache")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:N]: the bare libraries, the CLI and "
                             "whisperd all run there (fp16 and float16 on a GPU)")
    parser.add_argument("--variants", help="comma separated, of: "
                        + ", ".join(variants("cpu")[0]) + " (on a GPU: "
                        + ", ".join(variants("cuda")[0][3:]) + " for faster-whisper); "
                        "default: all but bare-fw-batch8 on a CPU, all on a GPU")
    parser.add_argument("--json", default=str(OUT / "transcribe.json"), help="results file")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for running test suites to end")
    parser.add_argument("--worker", choices=("ow", "fw"), help=argparse.SUPPRESS)
    parser.add_argument("--compute-type", default="int8", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.model_dir, args.compute_type, args.batch_size,
                           args.device)

    names, default = variants(args.device)
    want = [v.strip() for v in (args.variants or ",".join(default)).split(",") if v.strip()]
    unknown = set(want) - set(names)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    args.model_dir = ensure_models(args.model_dir)
    import whisperd  # the daemon's settings must be the CLI's, or the comparison is moot
    # a job's decoding: whisperd.DECODING and the defaults of the job's decoding options
    defaults = {f.name: f.default for f in whisperd.OPTIONS if f.metadata.get("decode")}
    decoding = dict(whisperd.DECODING, vad=defaults.get("vad"),
                    temperature=tuple(whisperd.temperatures(defaults.get("temperature", 0))),
                    condition_on_previous_text=defaults.get("condition_on_previous_text"))
    cli = dict(CLI_DECODING, logprob_threshold=LOGPROB_THRESHOLD, vad=False)
    if decoding != cli:
        sys.exit(f"whisperd decodes with {decoding} by default, not the CLI's {cli}: "
                 f"update the bench")

    sizes = "quick" if args.quick else "full" if args.full else "default"
    lengths, long, shorts = SIZES[sizes]
    files, short_files, warm = spoken(Path(args.audio_dir).resolve(), lengths, long, shorts)
    total = sum(audio_seconds(f) for f in files)
    print(f"audio: {len(files)} files, {total:.0f} s ({min(map(audio_seconds, files)):.0f} to "
          f"{max(map(audio_seconds, files)):.0f} s each); {len(short_files)} short files of "
          f"about {sum(map(audio_seconds, short_files)) / len(short_files):.0f} s", flush=True)
    if not args.no_wait:
        wait_until_quiet()

    bench = Bench(args, files, short_files, warm)
    started, watch = time.monotonic(), CpuWatch()
    if {"bare-ow", "whisperd-ow"} & set(want) or "cli" in want:
        bench.openai_whisper(want)
    if "cli" in want:
        bench.command_line()
    bench.faster_whisper(want)
    result = report(bench, sizes)
    result["bench_wall_s"] = round(time.monotonic() - started, 1)
    text, result["foreign_cpu_s"], result["foreign_cpu_share"] = watch.verdict()
    print(f"\n{text}")
    print(f"\nmeasured in {result['bench_wall_s']:.0f} s; results in {args.json}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
