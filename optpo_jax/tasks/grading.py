"""A small pool of grading worker processes with a hard per-call deadline.

math-verify bounds its own work with ``signal.alarm``, which only works on the main thread
(elsewhere math-verify raises and a caller sees "not equal") and can be defeated: an
alarm that fires while a garbage-collector callback runs (JAX registers one) has its
exception printed as "Exception ignored in ..." and swallowed, and the call then runs
unbounded. Here each check runs in a separate worker process (``grading_worker.py``, run
by path in a fresh interpreter: it imports math-verify only, never JAX, and is started
with ``subprocess`` - fork + exec - so no JAX threads are forked). The worker stops itself
after ``seconds`` with its own timer; the parent waits at most ``seconds + grace_seconds``
and otherwise kills the worker and starts a replacement. Either way the call reports a
timeout. Calls may come from any thread; up to ``workers`` run at once.

A worker that dies during a call (killed by a signal, e.g. the kernel's OOM killer, or
crashed), while starting or with the pair in flight, is replaced and the pair is sent
again, at most ``retries`` (default 2) more times: a death is never read as "not equal".
After that a death mid-check reports status "error", and one while starting raises
``WorkerDied``, naming the exit code or signal. A worker that reports that it could not
start (math-verify not importable, ...) raises ``GradingError`` with its error, at once.

One pool per process (``default_pool()``) is shared by every ``MathEquivalence``: it starts
its workers on first use (or ``start()``), and stops them at ``close()``, when the pool is
garbage collected, or at interpreter exit. A worker also exits by itself when its parent
process dies (end of input on its pipe, or its parent pid changing).

Settings (environment): ``OPTPO_GRADING_WORKERS`` (default 2), the default pool's size;
``OPTPO_GRADING_MEMORY_MB`` (default 4096, 0 for none), each worker's address-space limit.

Cost: about 0.1 ms of inter-process overhead per check (math-verify itself takes about as
long for short answers); a worker takes about a second to start (importing math-verify),
in the background, and ~60 MB of memory.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Self

WORKER_SCRIPT = Path(__file__).with_name("grading_worker.py")
DEFAULT_WORKERS = 2
DEFAULT_MEMORY_MB = 4096


class GradingError(RuntimeError):
    """A grading worker could not be started (e.g. math-verify is not importable)."""


class WorkerDied(GradingError):
    """A grading worker process died (killed by a signal, or exited) before it could answer;
    ``cause`` says how, e.g. "killed by signal 9 (SIGKILL)"."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause


def _exit_cause(process: subprocess.Popen) -> str:
    """How a worker process ended: "killed by signal 9 (SIGKILL)", "exited with code 1"."""
    try:
        code = process.wait(2.0)  # its pipe closed: it is exiting, if not gone already
    except subprocess.TimeoutExpired:
        return "closed its pipe but is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exited with code {code}"


class _Worker:
    """One worker process and its two pipe ends."""

    def __init__(self, memory_bytes: int):
        # -P: the script's folder (optpo_jax/tasks, which holds a math.py) must not shadow the stdlib.
        self.process = subprocess.Popen([sys.executable, "-P", str(WORKER_SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, start_new_session=True, close_fds=True)
        self.requests = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.replies = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.ready = False
        try:
            self.requests.send({"sys_path": [path for path in sys.path if path], "parent_pid": os.getpid(),
                                "memory_bytes": memory_bytes})
        except OSError:
            pass  # it died at once: wait_ready reports it

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, seconds: float) -> None:
        if self.ready:
            return
        try:
            if not self.replies.poll(seconds):
                raise GradingError(f"grading worker (pid {self.pid}) did not start within {seconds:g} s")
            message = self.replies.recv()
        except (EOFError, OSError) as error:  # it died without a word: killed, or crashed
            cause = _exit_cause(self.process)
            raise WorkerDied(f"grading worker (pid {self.pid}) died while starting: {cause}", cause) from error
        if isinstance(message, tuple) and message[:1] == ("failed",) and len(message) == 3:
            _, description, import_failed = message  # the worker's own report; its traceback is printed above
            if import_failed:
                raise GradingError(f"grading worker (pid {self.pid}) could not import math-verify ({description}): "
                                   f"is math-verify installed for {sys.executable}?")
            raise GradingError(f"grading worker (pid {self.pid}) failed while starting: {description}")
        if not (isinstance(message, tuple) and message[:1] == ("ready",)):
            raise GradingError(f"grading worker (pid {self.pid}) sent {message!r} instead of 'ready'")
        self.ready = True

    def kill(self) -> None:
        """Stops the process now and reaps it."""
        for connection in (self.requests, self.replies):
            connection.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self, wait_seconds: float = 1.0) -> None:
        """Asks the worker to exit (end of input), then kills it if it has not."""
        try:
            self.requests.close()
        except OSError:
            pass
        try:
            self.process.wait(wait_seconds)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _stop_all(workers: set, owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked copy of the pool: the workers are the parent's
        return
    for worker in list(workers):
        worker.stop(wait_seconds=0.2)
    workers.clear()


class GradingPool:
    """``workers`` grading processes; ``equal(first, second, seconds)`` under a hard deadline.

    ``grace_seconds``: how long past ``seconds`` the parent waits before killing a worker
    whose own timer did not stop it. ``startup_seconds``: how long a new worker may take to
    import math-verify (not counted in any call's deadline). ``memory_mb``: each worker's
    address-space limit (a runaway expansion raises MemoryError there: "not equal"); 0 for none.
    ``retries``: how many more times a call sends its pair to a fresh worker after the one
    checking it died (killed or crashed, while starting or mid-check).
    """

    def __init__(self, workers: int = DEFAULT_WORKERS, grace_seconds: float = 0.5, startup_seconds: float = 120.0,
                 memory_mb: int = DEFAULT_MEMORY_MB, retries: int = 2):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not isinstance(memory_mb, int) or isinstance(memory_mb, bool) or memory_mb < 0:
            raise ValueError(f"memory_mb must be an int >= 0, got {memory_mb!r}")
        self.size = workers
        self.memory_bytes = memory_mb << 20
        self.grace_seconds = float(grace_seconds)
        self.startup_seconds = float(startup_seconds)
        self.retries = retries
        self.kills = 0  # workers killed at the hard deadline (their call counted as a timeout)
        self.deaths = 0  # workers that died during a call, killed or crashed (its pair is sent again)
        self.last_death = ""  # how the latest of those ended, e.g. "killed by signal 9 (SIGKILL)"
        self._idle: queue.Queue = queue.Queue()
        self._workers: set[_Worker] = set()
        self._lock = threading.RLock()
        self._started = False
        self._closed = False
        self._owner_pid = os.getpid()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers, self._owner_pid)

    def start(self) -> GradingPool:
        """Starts the workers (they import math-verify in the background); idempotent."""
        with self._lock:
            if self._closed:
                raise GradingError("this grading pool is closed")
            if not self._started:
                for _ in range(self.size):
                    self._idle.put(self._spawn())
                self._started = True
        return self

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_bytes)
        with self._lock:
            self._workers.add(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
        return self._spawn()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return sorted(worker.pid for worker in self._workers)

    def _died(self, cause: str) -> None:
        with self._lock:
            self.deaths += 1
            self.last_death = cause

    def equal(self, first: str, second: str, seconds: float) -> tuple[bool, str]:
        """``(result, status)``: status "ok", "timeout" (worker timer or hard deadline; result
        False) or "error" (math-verify failed in an unexpected way, or the worker checking the
        pair died ``retries + 1`` times; False). An "error" is no verdict: do not cache it.

        Raises ``GradingError`` when a worker cannot start (``WorkerDied`` when it died while
        starting ``retries + 1`` times)."""
        self.start()
        worker = self._idle.get()
        pending = False  # a request is out: this worker must not serve another until it replies
        try:
            for attempt in range(self.retries + 1):
                if pending:  # the previous attempt's worker died with the pair in flight
                    worker, pending = self._replace(worker), False
                try:
                    worker.wait_ready(self.startup_seconds)
                except GradingError as error:
                    worker = self._replace(worker)
                    if isinstance(error, WorkerDied):
                        self._died(error.cause)
                    if not isinstance(error, WorkerDied) or attempt == self.retries:
                        raise
                    continue
                try:
                    pending = True
                    worker.requests.send((first, second, float(seconds)))
                    if not worker.replies.poll(seconds + self.grace_seconds):
                        with self._lock:
                            self.kills += 1
                        return False, "timeout"
                    reply = worker.replies.recv()
                    pending = False
                except (EOFError, OSError):  # it died mid-check (killed, crashed): send the pair again
                    self._died(_exit_cause(worker.process))
                    continue
                if reply[0] == "ok":
                    return bool(reply[1]), "ok"
                return False, "timeout" if reply[0] == "timeout" else "error"
            return False, "error"
        finally:
            if pending:  # overran, died, or the caller was interrupted (e.g. KeyboardInterrupt)
                worker = self._replace(worker)
            self._idle.put(worker)

    def close(self) -> None:
        """Stops every worker; the pool cannot be used afterwards."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number") from None


_default: GradingPool | None = None
_default_lock = threading.Lock()


def default_pool() -> GradingPool:
    """The process's shared pool (``OPTPO_GRADING_WORKERS`` workers), created on first use;
    a new one after ``close_default_pool()`` or in a forked child."""
    global _default
    with _default_lock:
        if _default is None or _default._closed or _default._owner_pid != os.getpid():
            _default = GradingPool(_environment_int("OPTPO_GRADING_WORKERS", DEFAULT_WORKERS),
                                   memory_mb=_environment_int("OPTPO_GRADING_MEMORY_MB", DEFAULT_MEMORY_MB))
        return _default


def close_default_pool() -> None:
    """Stops the shared pool's workers now (they also stop at interpreter exit)."""
    global _default
    with _default_lock:
        if _default is not None and _default._owner_pid == os.getpid():
            _default.close()
        _default = None

