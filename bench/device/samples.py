#!/usr/bin/env python3
"""What each thread of a whisperd process did, from bench/device/sampler's file: for every
thread, the share of the samples in [FROM, TO] (monotonic seconds) spent at each whisperd.py
line (with the library call under it), waits left out. Without FROM and TO, a timeline: the
threads busy in each tenth of a second, to find the timed part of a run.

  SAMPLE_OUT=DIR PYTHONPATH=$PWD/bench/device/sampler:$PYTHONPATH python3 bench/queue.py ...
  python3 bench/device/samples.py DIR/samples-PID.txt [FROM TO]
A thread asleep in C (time.sleep, a GPU call) shows as busy at its Python line.
"""
import collections
import sys

WAITS = ("threading.py:wait", "selectors.py:select", "socket.py:accept", "queue.py:get",
         "socketserver.py:serve_forever", "threading.py:_wait_for_tstate_lock")


def read(path):
    stacks, samples = {}, []
    for line in open(path):
        if line.startswith("S "):
            _, i, key = line.rstrip("\n").split(" ", 2)
            stacks[int(i)] = key.split("|")
        elif len(parts := line.split()) == 3:
            samples.append((float(parts[0]), parts[1], stacks[int(parts[2])]))
    return samples


def where(stack):
    ours = [f for f in stack if f.startswith("whisperd.py")]
    return ours[0] + (f"  <{stack[0]}>" if ours[0] != stack[0] else "") if ours else stack[0]


def main(path, start=None, end=None):
    samples = read(path)
    if start is None:
        timeline = collections.defaultdict(collections.Counter)
        for t, thread, stack in samples:
            if not stack[0].startswith(WAITS):
                timeline[round(t, 1)][thread] += 1
        for t in sorted(timeline):
            print(t, dict(timeline[t]))
        return
    ticks, busy = collections.Counter(), collections.defaultdict(collections.Counter)
    for t, thread, stack in samples:
        if start <= t <= end:
            ticks[thread] += 1
            if not stack[0].startswith(WAITS):
                busy[thread][where(stack)] += 1
    for thread, lines in busy.items():
        print(f"== {thread}: busy {sum(lines.values()) / ticks[thread]:.0%}")
        for line, n in lines.most_common(12):
            print(f"   {n / ticks[thread]:6.1%} {line}")


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:4]))
