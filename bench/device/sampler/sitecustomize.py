# A wall-clock sampler of every thread of the whisperd process (profiling on the GPU host).
# Lines: "S <id> <stack>" once per new stack, "<t> <thread> <id>" per sample. Flushed often:
# whisperd ends with os._exit.
import os
import sys
import threading
import time

if os.environ.get("SAMPLE_OUT"):
    def _loop():
        time.sleep(0.5)
        if not sys.argv or not sys.argv[0].endswith("whisperd.py"):
            return
        out = open(os.path.join(os.environ["SAMPLE_OUT"], f"samples-{os.getpid()}.txt"), "w")
        stacks, names, me, flushed = {}, {}, threading.get_ident(), time.monotonic()
        while True:
            time.sleep(0.004)
            t = time.monotonic()
            for th in threading.enumerate():
                names[th.ident] = th.name.replace(" ", "_")
            for ident, f in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                while f is not None and len(stack) < 14:
                    c = f.f_code
                    stack.append(f"{os.path.basename(c.co_filename)}:{c.co_name}:{f.f_lineno}")
                    f = f.f_back
                key = "|".join(stack)
                if key not in stacks:
                    stacks[key] = len(stacks)
                    out.write(f"S {stacks[key]} {key}\n")
                out.write(f"{t:.4f} {names.get(ident, ident)} {stacks[key]}\n")
            if t - flushed > 0.2:
                out.flush()
                flushed = t
    threading.Thread(target=_loop, daemon=True, name="sampler").start()
