#!/usr/bin/env python3
"""Words nobody said: how well whisperd's `suspect` flag tells invented segments from speech.

The set, built once into bench/out/suspect/audio from what Debian ships (16 kHz mono WAV):
  no speech at all (every segment Whisper writes for one is invented):
    silence (digital zero), room tone (pink noise at -60 dBFS), white, pink and brown noise
    (-30 and -20 dBFS), a tune of sine notes, a chord, DTMF-like beeps, a telephone ringback
    tone, hard-clipped clicks, and hold music: the five pieces of Debian's
    asterisk-moh-opsound-wav (its first 90 s each)
  recorded speech (Asterisk's English prompts, a woman's voice; LibriVox readings):
    prompts joined six at a time with 0.5 to 3 s between them; the same with 20 s of
    silence before and after; overdriven (hard-clipped) speech; speech under white noise
    (-30 dBFS); the LibriVox readings of pocketsphinx-testdata; with a multilingual model,
    Spanish and French prompts too
A segment of a speech file is real when it overlaps where a prompt was placed by 0.3 s or
half its own length; any other segment is invented. Each configuration is a whisperd run
(every file a job, format json, default options); the segments' `suspect` flags are counted.
Targets (issue "words nobody said"): at least 90% of invented segments caught, at most 1%
of real ones flagged.

  .venv/bin/python bench/suspect.py                      # tiny.en: both engines, and packed
  .venv/bin/python bench/suspect.py --configs ow-base,fw-base
  .venv/bin/python bench/suspect.py --score              # re-count the last runs' files with
                                                         # whisperd.is_suspect as it is now
Raw figures: bench/out/suspect/<config>/; the summary: bench/out/suspect/summary.json.
"""

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from _common import MODEL_DIR, OUT, Daemon, ensure_models, print_machine
from tools.harness import LIBRIVOX, SOUNDS, VOICES, convert, reading  # noqa: I100

import whisperd  # the repository's, on the path _common put first

HERE = OUT / "suspect"
AUDIO = HERE / "audio"
RATE = 16000
CONFIGS = {  # name: (model, whisperd's flags)
    "ow-tiny": ("tiny.en", ["--engine", "openai-whisper"]),
    "fw-tiny": ("tiny.en", ["--engine", "faster-whisper"]),
    "fw-tiny-pack": ("tiny.en", ["--engine", "faster-whisper", "--batch-size", "8", "--pack"]),
    "ow-base": ("base", ["--engine", "openai-whisper"]),
    "fw-base": ("base", ["--engine", "faster-whisper"]),
}
NOISES = {  # name: (lavfi source, seconds)
    "silence": ("anullsrc=r=16000:cl=mono", 40),
    "room-tone": ("anoisesrc=r=16000:c=pink:a=0.001", 40),
    "white-30": ("anoisesrc=r=16000:c=white:a=0.03", 40),
    "white-20": ("anoisesrc=r=16000:c=white:a=0.1", 40),
    "pink-30": ("anoisesrc=r=16000:c=pink:a=0.03", 40),
    "pink-20": ("anoisesrc=r=16000:c=pink:a=0.1", 40),
    "brown-20": ("anoisesrc=r=16000:c=brown:a=0.1", 40),
    "tune": ("aevalsrc='0.3*sin(2*PI*t*(262+66*floor(mod(t*3\\,5))))':s=16000", 30),
    "chord": ("aevalsrc='0.15*(sin(2*PI*262*t)+sin(2*PI*330*t)+sin(2*PI*392*t))':s=16000", 30),
    "dtmf": ("aevalsrc='if(lt(mod(t\\,0.5)\\,0.2)\\,0.3*(sin(2*PI*697*t)+sin(2*PI*1209*t))"
             "\\,0)':s=16000", 30),
    "ringback": ("aevalsrc='if(lt(mod(t\\,6)\\,2)\\,0.2*(sin(2*PI*440*t)+sin(2*PI*480*t))"
                 "\\,0)':s=16000", 36),
    "clicks": ("aevalsrc='if(lt(mod(t\\,0.7)\\,0.005)\\,1\\,0)':s=16000", 30),
}


def prompts(language):
    """[(path, script)] of a language's Asterisk prompts, in a fixed shuffled order."""
    import gzip
    scripts = Path(f"/usr/share/doc/asterisk-core-sounds-{language}/"
                   f"core-sounds-{language}.txt.gz")
    found = []
    with gzip.open(scripts, "rt", encoding="utf-8") as f:
        for line in f:
            key, _, text = line.partition(":")
            path = SOUNDS / VOICES[language] / f"{key.strip()}.g722"
            if text.strip() and path.exists():
                found.append((path, text.strip()))
    random.Random(language).shuffle(found)
    return found


def joined(name, clips, gaps, before=0.0, after=0.0, effect=None):
    """Writes the clips one after another, `gaps` seconds apart (and silence before and
    after) to AUDIO/name.wav; returns [(start, end)] of each clip in it."""
    import numpy
    from faster_whisper import decode_audio
    parts, placed, at = [numpy.zeros(int(before * RATE), numpy.float32)], [], before
    for (path, _), gap in zip(clips, gaps):
        audio = decode_audio(str(path))
        placed.append((round(at, 3), round(at + len(audio) / RATE, 3)))
        parts += [audio, numpy.zeros(int(gap * RATE), numpy.float32)]
        at += len(audio) / RATE + int(gap * RATE) / RATE
    parts.append(numpy.zeros(int(after * RATE), numpy.float32))
    raw = Path(tempfile.mkdtemp()) / "raw.f32"
    numpy.concatenate(parts).tofile(raw)
    convert(raw, AUDIO / f"{name}.wav", *(effect or []), "-ar", str(RATE), "-ac", "1",
            before=["-f", "f32le", "-ar", str(RATE), "-ac", "1"])
    shutil.rmtree(raw.parent)
    return placed


def build(multilingual):
    """The set: {file name: [(start, end)] of its speech, [] for none}."""
    manifest = HERE / ("manifest-multi.json" if multilingual else "manifest.json")
    if manifest.exists():
        return json.loads(manifest.read_text())
    AUDIO.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (source, seconds) in NOISES.items():
        convert(source, AUDIO / f"{name}.wav", "-t", str(seconds), "-ac", "1",
                before=["-f", "lavfi"])
        files[name] = []
    for music in sorted(Path("/usr/share/asterisk/moh").glob("*.wav")):
        name = "moh-" + music.stem
        convert(music, AUDIO / f"{name}.wav", "-t", "90", "-ar", str(RATE), "-ac", "1")
        files[name] = []
    english, rng = prompts("en"), random.Random(1)
    groups = [english[i:i + 6] for i in range(0, 6 * 24, 6)]
    for i, clips in enumerate(groups):
        gaps = [rng.uniform(0.5, 3.0) for _ in clips]
        files[f"speech-{i:02d}"] = joined(f"speech-{i:02d}", clips, gaps)
    more = english[6 * 24:]
    for i in range(4):
        clips = more[3 * i:3 * i + 3]
        files[f"padded-{i}"] = joined(f"padded-{i}", clips, [1.0] * 3, before=20, after=20)
    more = more[12:]
    for i in range(3):
        clips = more[4 * i:4 * i + 4]
        files[f"overdriven-{i}"] = joined(f"overdriven-{i}", clips, [1.0] * 4,
                                          effect=["-af", "volume=12"])
    more = more[12:]
    for i in range(3):
        clips = more[4 * i:4 * i + 4]
        name = f"noisy-{i}"
        files[name] = joined(name, clips, [1.0] * 4, after=1)
        noisy = AUDIO / f"{name}-mixed.wav"
        convert(AUDIO / f"{name}.wav", noisy, "-f", "lavfi", "-i",
                "anoisesrc=r=16000:c=white:a=0.03", "-filter_complex",
                "amix=inputs=2:duration=first:normalize=0")
        noisy.replace(AUDIO / f"{name}.wav")
    for wav in sorted(LIBRIVOX.glob("*.wav")):
        path, _ = reading(wav.stem)
        files["librivox-" + wav.stem[-4:]] = joined("librivox-" + wav.stem[-4:],
                                                   [(path, "")], [0.0])
    if multilingual:
        for language in ("es", "fr"):
            others = prompts(language)
            for i in range(4):
                clips = others[6 * i:6 * i + 6]
                gaps = [rng.uniform(0.5, 3.0) for _ in clips]
                files[f"{language}-{i}"] = joined(f"{language}-{i}", clips, gaps)
    manifest.write_text(json.dumps(files, indent=1))
    return files


def run(config, files):
    """Transcribes every file with whisperd as `config` says; the JSON files land in
    HERE/config/."""
    model, flags = CONFIGS[config]
    folder = HERE / config
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    daemon = Daemon(tempfile.mkdtemp(), ensure_models(MODEL_DIR, model), *flags,
                    "--max-queue", "1000", "--history", "1000", model=model).start()
    started = time.monotonic()
    try:
        jobs = [daemon.submit(path=AUDIO / f"{name}.wav", output_path=folder, format="json")
                for name in files]
        for job in jobs:
            done = daemon.finished(job["id"], timeout=3600)
            assert done["status"] == "COMPLETED", done
    finally:
        daemon.proc.terminate()
        daemon.proc.wait()
    print(f"  {config}: {len(files)} files in {time.monotonic() - started:.0f} s")


def label(segment, placed):
    if not placed:
        return "invented"
    length = max(segment["end"] - segment["start"], 0.0)
    overlap = max(sum(max(0.0, min(segment["end"], b) - max(segment["start"], a))
                      for a, b in placed), 0.0)
    return "real" if overlap >= min(0.3, length / 2) and overlap > 0 else "invented"


def score(config, files, vad=True):
    """Counts the flags of whisperd.is_suspect as it is now on the run's files (without
    `vad`: as if faster-whisper, and so speech_ratio, were not installed)."""
    counts = {"invented": [0, 0], "real": [0, 0]}  # kind: [flagged, all]
    missed, wrong = [], []
    for name, placed in files.items():
        path = HERE / config / f"{name}.json"
        segments = json.loads(path.read_text())["segments"]
        for segment, echo in zip(segments, whisperd.echoes(segments)):
            if not vad:
                segment.pop("speech_ratio", None)
            kind, flagged = label(segment, placed), whisperd.is_suspect(segment, echo)
            counts[kind][0] += flagged
            counts[kind][1] += 1
            if kind == "invented" and not flagged:
                missed.append((name, segment))
            if kind == "real" and flagged:
                wrong.append((name, segment))
    caught = counts["invented"][0] / max(counts["invented"][1], 1)
    flagged = counts["real"][0] / max(counts["real"][1], 1)
    config += "" if vad else " (no VAD)"
    print(f"{config:24} invented caught {counts['invented'][0]:4}/{counts['invented'][1]:<4}"
          f" {caught:6.1%}   real flagged {counts['real'][0]:3}/{counts['real'][1]:<4}"
          f" {flagged:6.1%}")
    for title, items in (("    missed", missed), ("    wrongly flagged", wrong)):
        for name, s in items:
            print(f"{title}: {name} {s['start']:.1f}-{s['end']:.1f} {s['text'].strip()!r} "
                  f"speech={s.get('speech_ratio')} nsp={s['no_speech_prob']:.2f} "
                  f"lp={s['avg_logprob']:.2f} cr={s['compression_ratio']:.2f}")
    return {"invented": counts["invented"], "real": counts["real"], "caught": caught,
            "flagged": flagged}


def vad_cost(files):
    """Milliseconds of CPU the voice activity detector takes a second of audio (heard(),
    which runs on every unbatched job's audio beside its decoding)."""
    from faster_whisper import decode_audio
    audio = [decode_audio(str(AUDIO / f"{name}.wav")) for name in files]
    started = time.process_time()
    for samples in audio:
        whisperd.heard(samples)
    spent = time.process_time() - started
    seconds = sum(len(samples) for samples in audio) / RATE
    print(f"voice activity detection: {1000 * spent / seconds:.2f} ms of CPU a second of "
          f"audio ({seconds:.0f} s of audio)")
    return 1000 * spent / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="ow-tiny,fw-tiny,fw-tiny-pack",
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--score", action="store_true",
                        help="only count again the files of the last runs")
    args = parser.parse_args()
    configs = args.configs.split(",")
    print_machine()
    summary = {"vad_ms_per_audio_second": vad_cost(build(multilingual=False))}
    for config in configs:
        files = build(multilingual=not CONFIGS[config][0].endswith(".en"))
        if not args.score:
            run(config, files)
        summary[config] = score(config, files)
        summary[config + " (no VAD)"] = score(config, files, vad=False)
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
