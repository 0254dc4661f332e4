"""Counters the evaluator can read and reset: how comparisons were decided, and how many timed out.

One set per process (each DataLoader worker and DDP rank counts its own);
``grading_stats().snapshot()`` gives plain ints to log or all-reduce.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, fields


@dataclass
class GradingStats:
    """Thread-safe counters of ``math_equal`` outcomes.

    comparisons: calls to ``math_equal``.
    fast: decided without sympy (string match, number, fraction, radical, pi expression...).
    sympy: sent to the sympy worker process.
    cached: answered from the cache of recent comparisons (also counted under rejected when rejected).
    timeouts: no answer from a sympy worker within the call's deadline (busy, or too slow); graded wrong.
    rejected: too long, too deep or too large to compare safely; compared as strings only.
    errors: the worker failed or an unexpected exception was caught; graded wrong.
    restarts: sympy workers killed (no answer in time, or failed) and replaced in the background.
    """

    comparisons: int = 0
    fast: int = 0
    sympy: int = 0
    cached: int = 0
    timeouts: int = 0
    rejected: int = 0
    errors: int = 0
    restarts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def reset(self) -> dict[str, int]:
        """Zero every counter; returns the values they had."""
        with self._lock:
            before = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
            for name in before:
                setattr(self, name, 0)
            return before


_STATS = GradingStats()
# A fork (DataLoader worker) while another thread holds the lock would leave the child's copy locked forever.
os.register_at_fork(after_in_child=lambda: setattr(_STATS, "_lock", threading.Lock()))


def grading_stats() -> GradingStats:
    """This process's grading counters (``.snapshot()``, ``.reset()``, ``.timeouts`` ...)."""
    return _STATS
