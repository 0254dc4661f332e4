"""The GPU check's log (bench/gpu_step.py): each line stamped with the time of day and the seconds since the start."""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the check's start (gpu_step.py imports this as it starts): its time budget counts from here


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {message}", flush=True)
