"""Per-call latency of ``math_equal`` with several threads grading at once (docs/grading.md, "The time bound").

Each of ``--threads`` threads makes ``--calls`` calls, cycling through a mix of
pairs, all distinct (no cache hits):

- easy: decided without sympy (numbers, fractions, radicals, ``x = ...``);
- symbolic: legitimate expressions with variables, which go to a sympy worker;
- prescreened: adversarial inputs decided without sympy: stopped by the pre-screen (``9^{9^{9^9}}``,
  ``1000000!``, deep nesting) or written numbers past float range (``1e4000000``, compared exactly);
- runaway: adversarial inputs that pass the pre-screen and make sympy run until it is killed
  (``((x^{999})^{999})^{999}`` is ``x`` to the power 997,002,999: exact arithmetic at a rational point).

The pool is warmed up first, so the figures are those of a running trainer (``--cold``: the
first calls start it, a start-up the bound does not cover). ``--cpu-load N`` adds N busy-loop
processes, as a trainer's data loaders would. Run with ``OMP_NUM_THREADS=1``::

    OMP_NUM_THREADS=1 .venv/bin/python bench/grader_latency.py [--mix mixed|adversarial] [--cold] [--cpu-load 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlm_post.rewards import grading_stats, math_equal, sympy_pool  # noqa: E402

# One cycle of each mix, per thread (threads start at different points of it). "mixed": one runaway
# in 8 calls, already far more than real rollouts produce; "adversarial": every other call is a runaway.
MIXES = {
    "mixed": ["easy", "easy", "symbolic", "easy", "runaway", "symbolic", "easy", "prescreened"],
    "adversarial": ["runaway", "symbolic", "runaway", "easy"],
}
SLACK_S = 0.05  # a timed-out call returns just after its deadline: killing a worker and returning is not free


def easy_pair(k: int) -> tuple[str, str, bool]:
    forms = [
        (f"\\frac{{{2 * k}}}{{4}}", f"{k / 2}", True),
        (f"x = {k}", f"{k}", True),
        (f"{k}\\sqrt{{3}}", f"{k * 3**0.5:.6f}", True),
        (f"{k + 1}", f"{k}", False),
    ]
    return forms[k % len(forms)]


def symbolic_pair(k: int) -> tuple[str, str, bool]:
    forms = [
        (f"(x+{k})^2", f"x^2 + {2 * k}x + {k * k}", True),
        (f"\\sin^2 x + \\cos^2 x + {k}", f"{k + 1} + 0y", True),
        (f"{k}x + 4 + 0y", f"{k + 1}x + 4", False),
    ]
    return forms[k % len(forms)]


def prescreened_pair(k: int) -> tuple[str, str, bool]:
    forms = [
        (f"9^{{9^{{9^{{{9 + k}}}}}}}", "1", False),
        (f"{1000000 + k}!", "5", False),
        ("(" * 3000 + str(k) + ")" * 3000, "1", False),
        (f"1e{4000000 + k}", f"2e{4000000 + k}", False),  # before the fix: 10^4000000 built under the GIL (2.7 s)
    ]
    return forms[k % len(forms)]


def runaway_pair(k: int) -> tuple[str, str, bool]:
    exponent = 900 + k % 100
    forms = [
        (f"((x^{{999}})^{{999}})^{{{exponent}}}", "x", False),
        (f"((x+1)^{{999}})^{{{exponent}}}", "x + 1", False),
        (f"((x+y)^{{999}})^{{{exponent}}}", "y", False),
    ]
    return forms[k % len(forms)]


PAIRS = {"easy": easy_pair, "symbolic": symbolic_pair, "prescreened": prescreened_pair, "runaway": runaway_pair}


@dataclass
class Call:
    kind: str
    seconds: float
    right: bool  # the verdict is the expected one (a symbolic pair that timed out is graded wrong)


def run_thread(
    thread: int, mix: list[str], calls: int, timeout_s: float, start: threading.Barrier, out: list[Call]
) -> None:
    start.wait()
    for index in range(calls):
        kind = mix[(index + thread) % len(mix)]
        prediction, reference, expected = PAIRS[kind](thread * calls + index)
        began = time.monotonic()
        verdict = math_equal(prediction, reference, timeout_s=timeout_s)
        out.append(Call(kind, time.monotonic() - began, verdict is expected))


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def table_row(name: str, calls: list[Call], timeout_s: float) -> str:
    times = sorted(call.seconds for call in calls)
    figures = [percentile(times, p) for p in (0.5, 0.9, 0.99)] + [times[-1]]
    over_bound = sum(t > timeout_s + SLACK_S for t in times)
    over_twice = sum(t > 2 * timeout_s for t in times)
    right = sum(call.right for call in calls)
    cells = [name, str(len(calls))] + [f"{t:.3f}" for t in figures] + [str(over_bound), str(over_twice), f"{right}"]
    return "| " + " | ".join(cells) + " |"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=40, help="calls per thread")
    parser.add_argument("--timeout", type=float, default=1.0, help="math_equal's timeout_s")
    parser.add_argument("--mix", choices=sorted(MIXES), default="mixed")
    parser.add_argument("--cold", action="store_true", help="no warm-up: the figures include the pool's start-up")
    parser.add_argument(
        "--cpu-load", type=int, default=0, help="busy-loop processes competing for the cores, as a trainer's would"
    )
    args = parser.parse_args()

    began = time.monotonic()
    if not args.cold:
        sympy_pool().warm_up()
    startup_s = time.monotonic() - began
    before = grading_stats().snapshot()

    calls: list[Call] = []  # list.append is atomic: the threads share it
    barrier = threading.Barrier(args.threads + 1)
    threads = [
        threading.Thread(target=run_thread, args=(t, MIXES[args.mix], args.calls, args.timeout, barrier, calls))
        for t in range(args.threads)
    ]
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.cpu_load)]
    try:
        for thread in threads:
            thread.start()
        barrier.wait()
        began = time.monotonic()
        for thread in threads:
            thread.join()
        wall_s = time.monotonic() - began
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    after = grading_stats().snapshot()

    print(f"machine: {machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {args.cpu_load} busy loops")
    print(f"{args.threads} threads x {args.calls} calls, mix {args.mix!r}, timeout_s={args.timeout}")
    if args.cold:
        print("no warm-up: the first calls start the sympy workers")
    else:
        print(f"pool warm-up (before the run, not in the figures): {startup_s:.2f} s")
    print(f"throughput: {len(calls) / wall_s:.1f} calls/s ({len(calls)} calls in {wall_s:.1f} s)")
    counted = ("sympy", "timeouts", "rejected", "restarts", "errors")
    print("grading_stats: " + ", ".join(f"{name} {after[name] - before[name]}" for name in counted))
    print()
    bound = args.timeout + SLACK_S
    print(f"| calls | n | p50 s | p90 s | p99 s | max s | > {bound:g} s | > {2 * args.timeout:g} s | right verdicts |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in PAIRS:
        of_kind = [call for call in calls if call.kind == kind]
        if of_kind:  # a short run may not reach every kind of the mix
            print(table_row(kind, of_kind, args.timeout))
    print(table_row("**all**", calls, args.timeout))
    latencies = sorted(call.seconds for call in calls)
    over = sum(latency > bound for latency in latencies)
    print(f"max_latency_s={latencies[-1]:.3f} over_bound={over}")  # the last line, as every bench script ends


if __name__ == "__main__":
    main()
