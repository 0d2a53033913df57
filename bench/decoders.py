#!/usr/bin/env python3
"""Does whisperd's in-process decoding (PyAV) give the samples of whisper's ffmpeg command?

The openai-whisper engine decodes with whisper.load_audio()'s own `ffmpeg` command, so that a
job's transcript is the `whisper` command line's (CONTRACT.md); faster-whisper's decodes in
whisperd's process through PyAV, which ships its own build of FFmpeg's libraries. This
script makes one sample (samples/speech.mp3, and a sentence spoken by espeak-ng) into the
formats users send, decodes each both ways (whisperd's own ffmpeg_decode() and
FasterWhisper.decode_audio()) and prints how many 16-bit samples differ, and by how much.
A format whose samples all agree could be decoded in-process for openai-whisper too.

  .venv/bin/python bench/decoders.py
"""

import subprocess
import sys

from _common import OUT, ROOT, speak
from tools.harness import convert  # noqa: I100

import whisperd  # the repository's, on the path _common put first

FORMATS = {  # file: ffmpeg options making it from the sample
    "mp3-22k-mono.mp3": [], "mp3-44k-stereo.mp3": ["-ar", "44100", "-ac", "2"],
    "flac-96k-stereo-s32.flac": ["-ar", "96000", "-ac", "2", "-sample_fmt", "s32"],
    "wav-16k-mono.wav": ["-ar", "16000", "-ac", "1"],
    "wav-8k-mulaw.wav": ["-ar", "8000", "-ac", "1", "-c:a", "pcm_mulaw"],
    "wav-32k-6ch.wav": ["-ar", "32000", "-ac", "6"],
    "g722-16k.g722": ["-ar", "16000", "-ac", "1"],
    "opus-48k-stereo.opus": ["-ar", "48000", "-ac", "2"],
    "aac-44k-stereo.m4a": ["-ar", "44100", "-ac", "2"],
    "vorbis-22k-mono.ogg": ["-ar", "22050", "-ac", "1", "-c:a", "libvorbis"]}


def main():
    import av
    import numpy
    folder = OUT / "decoders"
    folder.mkdir(parents=True, exist_ok=True)
    files = [speak("Thank you for calling. Please hold the line.", folder / "espeak-22k.wav")]
    for name, options in FORMATS.items():
        files.append(convert(ROOT / "samples" / "speech.mp3", folder / name, *options))
    version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True)
    print(f"{version.stdout.splitlines()[0]}; PyAV {av.__version__} with libavcodec "
          f"{'.'.join(map(str, av.library_versions['libavcodec']))}\n"
          "| file | samples | differing | most apart (of 32768) |\n|---|---:|---:|---:|")
    engine = whisperd.FasterWhisper.__new__(whisperd.FasterWhisper)  # decode_audio() only
    for path in files:
        ours = whisperd.ffmpeg_decode(str(path), 10 ** 9)[0]
        theirs = engine.decode_audio(str(path), 10 ** 9)
        n = min(ours.size, theirs.size)
        apart = numpy.abs(ours[:n] - theirs[:n]) * 32768
        length = "" if ours.size == theirs.size else f" ({theirs.size - ours.size:+d})"
        print(f"| {path.name} | {ours.size}{length} | {int((apart > 0.5).sum())} | "
              f"{apart.max():.0f} |")


if __name__ == "__main__":
    sys.exit(main())
