#!/usr/bin/env python3
"""What timing a batch's text costs: CTranslate2's Whisper generate() with and without
timestamp tokens, at batch 1, 8 and 32 windows, and the word alignment that times the text
instead (--batch-timing words).

The windows are the queue's recorded prompts (bench/queue.py: the Asterisk prompts of 5 to
15 s), one a window, encoded once; each generate() is whisperd's BatchDecoder's (beam 5,
the suppressed tokens, scores and no-speech probability), timed after one untimed call of
the same shapes. Beside each, in the same run, the same windows decoded without timestamps
and aligned: the ratio is what --batch-timing words saves (or costs) on this device.

  .venv/bin/python bench/timestamps.py                 # CPU
  python bench/timestamps.py --device cuda             # on a GPU host
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/queue.py shadows the stdlib's queue
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from bench._common import MODEL_DIR, OUT, ensure_models, print_machine  # noqa: E402
from bench.queue import queue_files  # noqa: E402


def timed(call):
    call()  # the same shapes once, untimed
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=MODEL_DIR)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="1,8,32", help="windows a batch")
    parser.add_argument("--json", default=str(OUT / "timestamps.json"))
    args = parser.parse_args()
    model_dir = ensure_models(args.model_dir, args.model)
    import numpy
    from faster_whisper import WhisperModel, decode_audio
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.transcribe import get_ctranslate2_storage

    import whisperd

    sizes = [int(n) for n in args.sizes.split(",")]
    m = print_machine()
    model = WhisperModel(os.path.join(model_dir, args.model), device=args.device,
                         compute_type="float16" if args.device != "cpu" else "int8")
    extract = model.feature_extractor
    audio = [decode_audio(str(path)) for path, _, _ in queue_files()[:max(sizes)]]
    features = numpy.stack([pad_or_trim(extract(a)[..., :-1], extract.nb_max_frames)
                            for a in audio])
    decoder = whisperd.BatchDecoder(model)  # its tokenizer, prompt and suppressed tokens
    tokenizer, prompt = decoder.tokenizer, decoder._prompt("en", "transcribe")
    options = dict(beam_size=whisperd.DECODING["beam_size"], max_length=model.max_length,
                   suppress_blank=True, suppress_tokens=decoder.suppress, return_scores=True,
                   return_no_speech_prob=True, max_initial_timestamp_index=50)
    rows = []
    for n in sizes:
        encoded = model.model.encode(get_ctranslate2_storage(features[:n]))
        with_stamps, _ = timed(lambda: model.model.generate(encoded, [prompt] * n, **options))
        without, results = timed(lambda: model.model.generate(
            encoded, [prompt + [tokenizer.no_timestamps]] * n, **options))
        texts = [[t for t in r.sequences_ids[0] if t < tokenizer.eot] or [tokenizer.eot]
                 for r in results]
        frames = [min(math.ceil(len(a) / 16000 * 100), 3000) for a in audio[:n]]
        aligned, _ = timed(lambda: model.find_alignment(tokenizer, texts, encoded, frames))
        rows.append({"windows": n, "timestamps_s": with_stamps, "no_timestamps_s": without,
                     "alignment_s": aligned,
                     "ratio": with_stamps / (without + aligned)})
        print(f"{n:3d} windows: with timestamp tokens {with_stamps * 1000:8.1f} ms; without "
              f"{without * 1000:7.1f} ms + alignment {aligned * 1000:6.1f} ms: "
              f"{rows[-1]['ratio']:.2f}x", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": m, "device": args.device,
        "model": args.model, "rows": rows}, indent=2) + "\n")
    print(f"results in {args.json}")


if __name__ == "__main__":
    main()
