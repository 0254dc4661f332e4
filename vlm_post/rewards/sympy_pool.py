"""A hard time bound for sympy comparisons that holds per call, in any thread of any process.

``signal.alarm`` only works in the main thread and cannot interrupt long C-level
arithmetic (``9**(9**9)``), so sympy runs in helper processes
(``sympy_worker.py``, started with ``subprocess``: no fork of a multithreaded
trainer, no re-import of the trainer's ``__main__``).

The bound is per call: a comparison's deadline counts from when the caller asks,
and covers both waiting for a free worker and the answer. Workers start in
background threads and a caller only ever takes one that is ready, so no caller
waits for a worker to import sympy. A worker that does not answer in time is
killed (SIGKILL, reaped in the background) and the caller returns at once: a
timeout, graded wrong. Its replacement starts in the background. The one wait
that no timeout covers is the pool's very first start (``wait_until_warm``); a
trainer takes it out of the first batch with ``warm_up()``.

One pool per process, created lazily; a forked child (DataLoader worker) drops
the parent's workers and starts its own on first use. Workers also exit when
their parent dies (stdin closes, and they poll the parent id).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from vlm_post.rewards.stats import grading_stats

WORKER_SCRIPT = Path(__file__).with_name("sympy_worker.py")
DEFAULT_TIMEOUT_S = 1.0  # per comparison, counted from the call (after the pool's one-off first start)
STARTUP_TIMEOUT_S = 30.0  # a worker importing sympy on a loaded machine; one slower than this is broken
RETRY_START_AFTER_S = 10.0  # after a failed start, do not respawn in a loop: comparisons are errors meanwhile
MIN_ANSWER_S = 0.01  # with less time left than this, a request cannot be answered: keep the worker, do not kill it
DEFAULT_MAX_WORKERS = 2


class _NoWorkers(RuntimeError):
    """No worker is running or starting (sympy failed to start here): an error, not a timeout."""


class _Worker:
    """One sympy process. Started by the pool in a background thread; then used by one caller at a time."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.ready = False  # set by the pool, under its lock
        self.buffer = b""
        self.next_id = 0

    def start(self) -> bool:
        """Spawn the process and wait until it has imported sympy; False when it fails to start in time."""
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        try:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C meant for the trainer does not kill it mid-answer
            )
            return self._read_line(time.monotonic() + STARTUP_TIMEOUT_S) == b"ready"
        except (OSError, EOFError, ValueError):
            return False

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the worker, or None at the deadline. poll(), not select(): fds above 1024 are fine."""
        fd = self.process.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("sympy worker exited")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def ask(self, request: dict, timeout_s: float) -> dict | None:
        """The worker's reply, or None when it did not answer within ``timeout_s``."""
        self.next_id += 1
        request = dict(request, id=self.next_id)
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._read_line(deadline)
            if line is None:
                return None
            reply = json.loads(line)
            if reply.get("id") == self.next_id:
                return reply

    def kill(self, *, wait: bool = False, close_pipes: bool = True) -> None:
        """SIGKILL. Without ``wait`` the exit is reaped by a background thread: a timed-out caller returns at once.

        ``close_pipes=False`` when another thread may still be reading them (it closes them itself).
        """
        process = self.process
        if process is None:  # still being spawned: its starter thread sees the pool let it go, and kills it
            return
        with contextlib.suppress(OSError):  # already gone
            process.kill()
        if close_pipes:
            self.close_pipes()
        if wait:
            _reap(process)
        else:
            threading.Thread(target=_reap, args=(process,), name="sympy-worker-reap", daemon=True).start()

    def close_pipes(self) -> None:
        if self.process is None:
            return
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError, ValueError):
                pipe.close()


def _reap(process: subprocess.Popen) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        process.wait(timeout=30)


class SympyPool:
    """Up to ``max_workers`` sympy processes shared by this process's threads.

    Every worker is starting, idle (ready, nobody's) or in use by one caller. Workers start in threads of
    their own, and the pool is refilled as soon as one is killed, so callers only wait for ready workers.
    """

    def __init__(self, max_workers: int = DEFAULT_MAX_WORKERS) -> None:
        self.max_workers = max_workers
        self._failed_start_at = -math.inf
        self._reset()

    def _reset(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()  # starting, idle or in use
        self._warm = False  # a worker has been ready since the last reset: from then on, starts are not waited for
        self._pid = os.getpid()

    def _after_fork_in_child(self) -> None:
        # The parent's workers belong to the parent: close our copies of their pipes (so they still
        # see EOF when the parent exits) without killing them, and start afresh.
        for worker in self._all:
            worker.close_pipes()
        self._reset()

    # --- starting workers ---------------------------------------------------------------------------

    def _fill(self) -> None:
        """Start workers, each in a thread of its own, until the pool is at full strength. Call under the lock."""
        if time.monotonic() - self._failed_start_at < RETRY_START_AFTER_S:
            return
        while len(self._all) < self.max_workers:
            worker = _Worker()
            self._all.add(worker)
            threading.Thread(target=self._start, args=(worker,), name="sympy-worker-start", daemon=True).start()

    def _start(self, worker: _Worker) -> None:
        ready = worker.start()
        with self._condition:
            wanted = worker in self._all  # not closed meanwhile
            if ready and wanted:
                worker.ready = self._warm = True
                self._idle.append(worker)
            elif wanted:
                self._all.discard(worker)
                self._failed_start_at = time.monotonic()
            self._condition.notify_all()
        if not (ready and wanted):
            worker.kill(wait=True)
            if wanted:
                grading_stats().add("errors")

    def wait_until_warm(self) -> float:
        """Wait (at most ``STARTUP_TIMEOUT_S``) until the pool's first worker is ready; the seconds waited.

        This one-off start (at first use, after ``close()``, in a forked child) is the one wait that no
        comparison's timeout covers: counting it would grade the first symbolic answers of every process
        wrong. Once a worker has been ready, this returns 0 at once and every start happens in the background.
        """
        if self._warm:
            return 0.0
        began = time.monotonic()
        with self._condition:
            while not self._warm:
                self._fill()
                remaining = began + STARTUP_TIMEOUT_S - time.monotonic()
                if not self._all or remaining <= 0:
                    break
                self._condition.wait(remaining)
        return time.monotonic() - began

    def warm_up(self, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
        """Start every worker now and wait until all are ready (optional): True when they are.

        A trainer calls this at setup, so that its first batch does not wait for sympy to be imported.
        """
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while True:
                self._fill()
                if len(self._all) == self.max_workers and all(worker.ready for worker in self._all):
                    return True
                remaining = deadline - time.monotonic()
                if not self._all or remaining <= 0:
                    return False
                self._condition.wait(remaining)

    # --- comparing ----------------------------------------------------------------------------------

    def _acquire(self, deadline: float) -> _Worker | None:
        """A ready worker, or None at the deadline; raises _NoWorkers when none is running or starting."""
        with self._condition:
            while not self._idle:
                self._fill()
                if not self._all:
                    raise _NoWorkers("no sympy worker could be started")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._condition.wait(remaining)
            return self._idle.pop()

    def _release(self, worker: _Worker, healthy: bool) -> None:
        """Give a worker back; one that failed or did not answer in time is killed and replaced in the background."""
        if not healthy:
            worker.kill()  # first, so that a runaway stops burning a core now
            grading_stats().add("restarts")
        with self._condition:
            owned = worker in self._all  # False: the pool was closed while the worker was in use
            if healthy and owned:
                self._idle.append(worker)
            elif owned:
                self._all.discard(worker)
                self._fill()
            self._condition.notify_all()
        if healthy and not owned:
            worker.kill()

    def compare(self, a: list, b: list, rel_tol: float, timeout_s: float, **extra) -> bool | None:
        """Whether trees ``a`` and ``b`` are equal; None on timeout (no ready worker, or no answer, in time).

        ``timeout_s`` counts from this call: waiting for a ready worker and the comparison itself. Only the
        pool's one-off first start comes on top (``wait_until_warm``). ``extra`` goes to the worker (test hooks).
        """
        self.wait_until_warm()
        deadline = time.monotonic() + timeout_s
        try:
            worker = self._acquire(deadline)
        except _NoWorkers:
            grading_stats().add("errors")
            return False
        if worker is None:
            return None
        healthy = False
        try:
            remaining = deadline - time.monotonic()
            if remaining < MIN_ANSWER_S:  # no answer could come back in time: do not start what we would kill
                healthy = True
                return None
            reply = worker.ask({"a": a, "b": b, "rel_tol": rel_tol, **extra}, remaining)
            if reply is None:
                return None
            healthy = True
            if "error" in reply:
                grading_stats().add("errors")
            return bool(reply.get("equal"))
        except (OSError, EOFError, ValueError):
            grading_stats().add("errors")
            return False
        finally:
            self._release(worker, healthy)

    def close(self) -> None:
        """Kill this process's workers and wait for them (they are started again lazily if needed)."""
        if os.getpid() != self._pid:
            return
        with self._condition:
            workers, idle = list(self._all), set(self._idle)
            self._all, self._idle, self._warm = set(), [], False
            self._condition.notify_all()
        for worker in workers:
            # A worker in use is read by its caller, and a starting one by its starter: they close those pipes.
            worker.kill(wait=True, close_pipes=worker in idle)


_POOL = SympyPool()
os.register_at_fork(after_in_child=_POOL._after_fork_in_child)
atexit.register(_POOL.close)


def sympy_pool() -> SympyPool:
    """This process's pool of sympy workers."""
    return _POOL
