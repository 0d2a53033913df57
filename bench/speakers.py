#!/usr/bin/env python3
"""Who said what: how often whisperd gives a word to the right speaker, and what it costs.

The set: conversations built by tools/harness.py's conversation() from turns of real
recorded voices (Debian's Asterisk prompts: Allison in English, Carlo in Italian, June in
French, the Russian IVR voice; a LibriVox reader from pocketsphinx-testdata), 2, 3 and 4
voices, each turn one or two clips of 1.5-7 s, 0.3-0.8 s apart; who spoke when is known.
Each is transcribed by faster-whisper (tiny.en, the `whisper` command line's options, word
timings), then diarized by whisperd's own code (whisperd.Engine.speakers' steps: the voice
activity detector, Resemblyzer's turns, attribute()):
  found     the number of voices found (silhouette), word timings: words given to the right
            speaker (each label stands for the voice it was most given to)
  given     the number of voices given (`speakers`)
  segments  found, without word timings (the batch path's case): each word counted with its
            segment's speaker
Cost: seconds of diarization (detector, embeddings, clustering, attribution) against the
seconds of transcription of the same file, in the same run, 2 cores.
Targets (issue "who said what"): >= 95% of words right on 3 voices; diarization under a
quarter of the transcription time with tiny.en on 2 cores.

  .venv/bin/python bench/speakers.py            # transcribes (cached in bench/out/speakers)
  .venv/bin/python bench/speakers.py --score    # diarizes the cached transcripts again
"""

import argparse
import json
import os
import statistics
import sys
import time

from _common import BENCH, MODEL_DIR, OUT, ensure_models, print_machine

# bench/queue.py is not the standard library's queue, which whisperd and torch import.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != str(BENCH)]
from tools.harness import TALKERS, conversation, reference, who_spoke, words_right  # noqa

import whisperd  # the repository's, on the path _common put first


HERE = OUT / "speakers"
SETS = [["allison", "carlo"], ["june", "librivox"], ["allison", "ivr"],
        ["allison", "carlo", "june"], ["carlo", "june", "ivr"], ["allison", "june", "librivox"],
        ["allison", "ivr", "librivox"], ["allison", "carlo", "june", "ivr"],
        ["june", "carlo", "librivox", "allison"]]
SEEDS = {2: (0, 1), 3: (0, 1, 2, 3, 6), 4: (0, 1)}  # seed 6: a voice heard once, at the end
TURNS = 10  # 8 for seed 6


def transcribe(model, path):
    from faster_whisper.audio import decode_audio
    audio = decode_audio(str(path))
    started = time.perf_counter()
    segments, _ = model.transcribe(audio, language="en", word_timestamps=True, beam_size=5,
                                   best_of=5, temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                                   condition_on_previous_text=True)
    segments = [{"id": i, "start": s.start, "end": s.end, "text": s.text,
                 "words": [{"word": w.word, "start": w.start, "end": w.end} for w in s.words]}
                for i, s in enumerate(segments)]
    return {"text": "".join(s["text"] for s in segments), "segments": segments,
            "seconds": time.perf_counter() - started}


def diarize(voices, audio, result, count=None):
    """whisperd's Engine.speakers, its steps timed."""
    started = time.perf_counter()
    speech = whisperd.heard(audio, **whisperd.Resemblyzer.PARTED)
    turns, _ = voices.turns(audio, speech, count)
    labelled = whisperd.attribute(result, turns)
    return labelled, time.perf_counter() - started, turns


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--score", action="store_true", help="reuse the cached transcripts")
    args = parser.parse_args()
    HERE.mkdir(parents=True, exist_ok=True)
    print_machine()
    from faster_whisper.audio import decode_audio
    model = None
    if not args.score:
        from faster_whisper import WhisperModel
        model_dir = ensure_models(MODEL_DIR)
        model = WhisperModel(f"{model_dir}/tiny.en", device="cpu", cpu_threads=2)
    voices = whisperd.Resemblyzer("cpu")
    clips = {v: decode_audio(str(reference(HERE / f"reference-{v}.wav", v))) for v in TALKERS}
    clips = dict(zip(clips, voices.embed_clips(list(clips.values()))))
    rows = []
    for voices_of in SETS:
        for seed in SEEDS[len(voices_of)]:
            name = f"{'-'.join(voices_of)}-{seed}"
            wav, cached = HERE / f"{name}.wav", HERE / f"{name}.json"
            said = conversation(wav, voices_of, 8 if seed == 6 else TURNS, seed=seed)
            if args.score and cached.exists():
                result = json.loads(cached.read_text())
            else:
                result = transcribe(model, wav)
                cached.write_text(json.dumps(result))
            audio = decode_audio(str(wav))
            found, cost, turns = diarize(voices, audio, result)
            given, *_ = diarize(voices, audio, result, len(voices_of))
            bare = dict(result, segments=[{k: v for k, v in s.items() if k != "words"}
                                          for s in result["segments"]])
            plain, *_ = diarize(voices, audio, bare)
            row = {"name": name, "voices": len(voices_of), "seconds": len(audio) / 16000,
                   "found_voices": len({voice for *_, voice in turns}),
                   "der": _der(said, turns),
                   "found": words_right(said, found["segments"]),
                   "given": words_right(said, given["segments"]),
                   "segments": _segment_words_right(said, result, plain),
                   "words": sum(len(s["words"]) for s in result["segments"]),
                   "transcribe_s": result["seconds"], "diarize_s": cost}
            row["alike"] = _alike(voices, audio, turns, said, clips)
            rows.append(row)
            print(f"{name:<34} {row['seconds']:5.1f} s  voices {row['voices']} found "
                  f"{row['found_voices']}  DER {row['der']:.3f}  words right: found {row['found']:.3f} given "
                  f"{row['given']:.3f} segments {row['segments']:.3f}  ({row['words']} words)"
                  f"  diarize/transcribe {cost / result['seconds']:.3f}", flush=True)
    summary = {}
    for count in (2, 3, 4):
        mine = [r for r in rows if r["voices"] == count]
        summary[count] = {key: round(statistics.mean(r[key] for r in mine), 3)
                          for key in ("found", "given", "segments", "der")}
        summary[count]["count_right"] = sum(r["found_voices"] == count for r in mine)
        summary[count]["conversations"] = len(mine)
    minutes = sum(r["seconds"] for r in rows) / 60
    cost = {"diarize_s_per_audio_min": round(sum(r["diarize_s"] for r in rows) / minutes, 2),
            "transcribe_s_per_audio_min": round(sum(r["transcribe_s"] for r in rows) / minutes,
                                                2) if not args.score else None,
            "diarize_over_transcribe": round(sum(r["diarize_s"] for r in rows)
                                             / sum(r["transcribe_s"] for r in rows), 3)}
    alike = [pair for r in rows for pair in r["alike"]]
    same = sorted(a for a, is_it in alike if is_it)
    other = sorted(a for a, is_it in alike if not is_it)
    summary["references"] = {
        "same_voice_min": same[0], "same_voice_p05": same[len(same) // 20],
        "other_voice_max": other[-1], "other_voice_p95": other[len(other) * 19 // 20],
        "pairs": len(alike), "named_wrong_at_SAME": sum(a >= whisperd.Resemblyzer.SAME
                                                        for a in other),
        "unnamed_at_SAME": sum(a < whisperd.Resemblyzer.SAME for a in same)}
    print(json.dumps({"words_right_by_voices": summary, "cost": cost}, indent=1))
    (HERE / "summary.json").write_text(json.dumps({"rows": rows, "summary": summary,
                                                   "cost": cost}, indent=1))


def _der(said, turns):
    """The diarization error rate, in 10 ms frames: the share of the time someone speaks
    that is missed, or given to the wrong voice (each voice found stands for the true voice
    it overlaps most, one each), plus the time given to a voice where nobody speaks."""
    import collections
    frame = lambda t: int(round(t * 100))  # noqa: E731
    truth, found = {}, {}
    for start, end, voice, *_ in said:
        truth.update((f, voice) for f in range(frame(start), frame(end)))
    for start, end, voice in turns:
        found.update((f, voice) for f in range(frame(start), frame(end)))
    overlap = collections.Counter((truth[f], found[f]) for f in truth if f in found)
    voice_of, taken = {}, set()
    for (real, label), _ in overlap.most_common():
        if label not in voice_of and real not in taken:
            voice_of[label], _ = real, taken.add(real)
    missed = sum(f not in found for f in truth)
    confused = sum(f in found and voice_of.get(found[f]) != truth[f] for f in truth)
    false_alarm = sum(f not in truth for f in found)
    return round((missed + confused + false_alarm) / len(truth), 4)


def _alike(voices, audio, turns, said, clips):
    """How alike each reference clip (`clips`: {voice: unit vector}, from recordings heard
    nowhere in the conversation) is to each voice found, as turns() compares them (the
    centre of the voice's pieces): [(similarity, whether it is that voice)], for SAME."""
    import numpy
    pairs = []
    for label in {voice for *_, voice in turns}:
        mine = [(a, b) for a, b, voice in turns if voice == label]
        truth = max({v for *_, v, _ in said}, key=lambda v: sum(
            max(0, min(b, t1) - max(a, t0)) for a, b in mine for t0, t1, tv, _ in said
            if tv == v))
        centre = voices.embed(audio, mine).mean(0)
        centre /= numpy.linalg.norm(centre)
        pairs += [(round(float(centre @ clip), 3), v == truth) for v, clip in clips.items()]
    return pairs


def _segment_words_right(said, result, plain):
    """Words right when each word takes the speaker of the segment (without word timings)
    it fell in: the word's middle inside the segment's time."""
    words = [w for s in result["segments"] for w in s["words"]]
    given = []
    for w in words:
        middle = (w["start"] + w["end"]) / 2
        segment = min(plain["segments"], key=lambda s: 0 if s["start"] <= middle <= s["end"]
                      else min(abs(middle - s["start"]), abs(middle - s["end"])))
        given.append(dict(w, speaker=segment["speaker"]))
    return words_right(said, [{"words": given}])


if __name__ == "__main__":
    main()
