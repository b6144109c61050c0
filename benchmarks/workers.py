"""What the side-by-side benchmarks share: engines in worker processes, asked for one round at a time.

An engine (a runtime, a Keras backend, timm) runs in a process of its own: the
backend is chosen at import, and one engine's threads and caches must not slow
another. A worker loads and warms its contenders once, prints one `ready`
line, then runs one round each time its parent writes "round" on its stdin
and prints the round's results. The parent asks every worker in turn, so only
one runs at a time and a drift in the machine's load hits every engine alike.
Used by benchmarks/speed.py and benchmarks/serving_speed.py (and, for its
protocol lines, benchmarks/gpu_speed.py, which runs its jobs one after the other).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "BENCHMARK_RESULT "  # a worker's protocol lines start with this


def cpu_description():
    """'model name, N cores; AMX yes/no, AVX512_BF16 yes/no' from /proc/cpuinfo."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    amx = "yes" if "amx_bf16" in flags else "no"
    bf16 = "yes" if "avx512_bf16" in flags else "no"
    return f"{name}, {os.cpu_count()} cores; AMX {amx}, AVX512_BF16 {bf16}"


def emit(**record):
    """Worker side: one protocol line to the parent."""
    print(RESULT + json.dumps(record), flush=True)


def describe(error):
    """One line for a table: a worker's exception, and where it came from when it says nothing."""
    text = f"{type(error).__name__}: {error}".strip()
    if not str(error).strip() and error.__traceback__ is not None:
        import traceback

        frame = traceback.extract_tb(error.__traceback__)[-1]
        text += f" (at {os.path.basename(frame.filename)}:{frame.lineno})"
    return " ".join(text.split())[:300]


def serve_rounds(run_round):
    """Worker side, once warm: `run_round()` (a dict of results) per "round" line on stdin."""
    for line in sys.stdin:
        if line.strip() != "round":
            break
        emit(round=run_round())


class Worker:
    """Parent side: one worker process, `python script --worker ENGINE ...`."""

    def __init__(self, script, arguments, env=None):
        environment = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        environment.update(env or {})
        self.process = subprocess.Popen([sys.executable, os.path.abspath(script)] + list(arguments),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment)
        self.ready = self.read()

    def read(self):
        for line in self.process.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        return dict(ready=False, error=f"the worker exited with status {self.process.wait()}")

    def round(self):
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        return self.read().get("round", {})

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()
