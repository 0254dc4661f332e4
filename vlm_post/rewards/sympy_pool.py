"""A hard time bound for sympy comparisons that holds in any thread of any process.

``signal.alarm`` only works in the main thread and cannot interrupt long C-level
arithmetic (``9**(9**9)``), so sympy runs in helper processes
(``sympy_worker.py``, started with ``subprocess``: no fork of a multithreaded
trainer, no re-import of the trainer's ``__main__``). A comparison that does not
answer in time is counted as a timeout, and its worker is killed and replaced
at once, so the replacement is importing sympy while the caller moves on.

One pool per process, created lazily; a forked child (DataLoader worker) drops
the parent's workers and starts its own on first use. Workers also exit when
their parent dies (stdin closes, and they poll the parent id).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from vlm_post.rewards.stats import grading_stats

WORKER_SCRIPT = Path(__file__).with_name("sympy_worker.py")
DEFAULT_TIMEOUT_S = 1.0  # per comparison, once a worker is ready
STARTUP_TIMEOUT_S = 30.0  # a worker importing sympy on a loaded machine; not counted in the timeout above
DEFAULT_MAX_WORKERS = 2


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for the trainer does not kill it mid-answer
        )
        self.started = time.monotonic()
        self.ready = False
        self.buffer = b""
        self.next_id = 0

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the worker, or None at the deadline. poll(), not select(): fds above 1024 are fine."""
        import select

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

    def wait_ready(self) -> bool:
        if not self.ready:
            line = self._read_line(self.started + STARTUP_TIMEOUT_S)
            self.ready = line == b"ready"
        return self.ready

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

    def kill(self) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # already gone
            self.process.kill()
            self.process.wait(timeout=5)
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError, ValueError):
                pipe.close()


class SympyPool:
    """Up to ``max_workers`` sympy processes shared by this process's threads."""

    def __init__(self, max_workers: int = DEFAULT_MAX_WORKERS) -> None:
        self.max_workers = max_workers
        self._reset()

    def _reset(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._pid = os.getpid()

    def _after_fork_in_child(self) -> None:
        # The parent's workers belong to the parent: close our copies of their pipes (so they still
        # see EOF when the parent exits) without killing them, and start afresh.
        for worker in self._all:
            worker.close_pipes()
        self._reset()

    def _acquire(self, deadline: float) -> _Worker | None:
        with self._condition:
            while True:
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self.max_workers:
                    worker = _Worker()
                    self._all.add(worker)
                    return worker
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._condition.wait(remaining)

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
            grading_stats().add("restarts")
        with self._condition:
            if worker not in self._all:  # the pool was closed while this worker was busy
                worker.kill()
            elif healthy:
                self._idle.append(worker)
            else:
                self._all.discard(worker)
                if len(self._all) < self.max_workers:  # replace now: it imports sympy while we carry on
                    try:
                        replacement = _Worker()
                    except OSError:
                        replacement = None  # started again on demand
                    if replacement is not None:
                        self._all.add(replacement)
                        self._idle.append(replacement)
            self._condition.notify()

    def compare(self, a: list, b: list, rel_tol: float, timeout_s: float, **extra) -> bool | None:
        """Whether trees ``a`` and ``b`` are equal; None on timeout (no worker free, or no answer in time).

        ``timeout_s`` covers waiting for a free worker and the comparison; only the one-off start
        of a fresh worker (importing sympy, ~0.5 s) comes on top.
        """
        deadline = time.monotonic() + timeout_s
        worker = self._acquire(deadline)
        if worker is None:
            return None
        healthy = False
        try:
            if not worker.ready:
                waited_from = time.monotonic()
                if not worker.wait_ready():
                    grading_stats().add("errors")
                    return False
                deadline += time.monotonic() - waited_from
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # no time left after waiting for a worker: do not start what we would kill
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

    def warm_up(self) -> None:
        """Start one worker now (optional): the first symbolic comparison then skips the sympy import."""
        worker = self._acquire(time.monotonic() + STARTUP_TIMEOUT_S)
        if worker is not None:
            healthy = worker.wait_ready()
            self._release(worker, healthy)

    def close(self) -> None:
        """Kill this process's workers (they are restarted lazily if needed again)."""
        if os.getpid() != self._pid:
            return
        with self._condition:
            workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            worker.kill()


_POOL = SympyPool()
os.register_at_fork(after_in_child=_POOL._after_fork_in_child)
atexit.register(_POOL.close)


def sympy_pool() -> SympyPool:
    """This process's pool of sympy workers."""
    return _POOL
