"""Answer equivalence with math-verify, and the worker process that runs it for ``grading.GradingPool``.

This module imports only the standard library and math-verify (never JAX or the rest of
optpo_jax), so ``grading.GradingPool`` can run it by path in a fresh interpreter as a worker:

    python -P grading_worker.py    # requests on stdin, replies on stdout (multiprocessing.connection frames)

Protocol: the parent first sends ``{"sys_path": [...], "parent_pid": int, "memory_bytes": int}``
(its address-space limit, 0 for none); the worker
answers ``("ready", pid)`` once math-verify is imported and warmed up, or
``("failed", "ErrorType: message", import_failed)`` when it cannot start (then exits with its
traceback on stderr; a worker that dies without that reply was killed or crashed). Then each request
``(first, second, seconds)`` gets one reply: ``("ok", bool)``, ``("timeout",)`` when the
worker's own timer (``seconds``) ran out, or ``("error", message)``. The parent also
enforces a hard deadline (``seconds`` plus a grace) by killing the worker, which covers a
timer that never fires or whose exception is swallowed. The worker exits on end of input
(the parent closed the pipe or died) and when its parent process goes away.

``equal`` and ``parse_whole`` can also be called in-process (tests, debugging); they have no
time limit of their own there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time

_MATH_VERIFY: dict = {}
_LEADING_RELATION = re.compile(r"^(?:=|\\approx(?![a-zA-Z])|\\simeq(?![a-zA-Z]))\s*")
_EMPTY_DELIMITER = re.compile(r"\\(?:left|right)\.")


def _math_verify() -> dict:
    """math-verify's pieces, imported on first use (a worker first extends sys.path as its parent's)."""
    if not _MATH_VERIFY:
        from latex2sympy2_extended.latex2sympy2 import normalize_latex
        from math_verify import verify
        from math_verify.parser import LatexExtractionConfig, parse_latex_cached

        _MATH_VERIFY.update(normalize_latex=normalize_latex, verify=verify, parse_latex=parse_latex_cached,
                            normalization=LatexExtractionConfig().normalization_config)
    return _MATH_VERIFY


def parse_whole(answer: str) -> list:
    """math-verify's reading of ``answer`` as one LaTeX expression: ``[expr, normalized]``,
    ``[normalized]`` when it does not parse, or ``[]`` when empty.

    ``math_verify.parse(f"${answer}$")`` searches the string for anything it can read: when
    the whole string is not valid LaTeX it falls back to the first number-like piece, so
    ``\\sin 2 \\cup`` reads as ``2`` and ``\\log 0.5 \\times`` as ``0.5``. Here the answer
    must parse as a whole (math-verify's LaTeX normalisation, then latex2sympy on the full
    string); otherwise only its normalised string remains, which equals nothing but the
    same string. Decoration that leaves the value as it is goes first: a leading ``=`` or
    ``\\approx``, trailing commas and semicolons, ``~`` (a LaTeX space), ``\\left.``/``\\right.``.
    """
    text = answer.replace("\n", " ").replace("~", " ").strip()
    text = _EMPTY_DELIMITER.sub(" ", _LEADING_RELATION.sub("", text)).rstrip(" ,;").strip()
    if not text:
        return []
    mv = _math_verify()
    normalized = mv["normalize_latex"](text, config=mv["normalization"])
    try:
        return [mv["parse_latex"](normalized), normalized]
    except Exception:  # noqa: BLE001 - not LaTeX as a whole: not an expression
        return [normalized] if normalized.strip() else []


def _unbounded(parsed: list) -> bool:
    """Whether a parsed answer's expression holds an infinity or NaN."""
    import sympy

    special = (sympy.S.Infinity, sympy.S.NegativeInfinity, sympy.S.ComplexInfinity, sympy.S.NaN)
    return any(callable(getattr(item, "has", None)) and not isinstance(item, str) and item.has(*special)
               for item in parsed)


def equal(first: str, second: str) -> bool:
    """Whether two answers are the same mathematical object, per math-verify (no time limit)."""
    gold, target = parse_whole(first), parse_whole(second)
    if not gold or not target:
        return False
    if _unbounded(gold) != _unbounded(target):
        return False  # sympy's simplify(1/2 - 2*oo) is now and then "zero": math-verify then says equal
    verify = _math_verify()["verify"]
    try:
        return bool(verify(gold, target, timeout_seconds=None, raise_on_error=True))
    except Exception:  # noqa: BLE001 - one bad pair: let math-verify compare the others
        return bool(verify(gold, target, timeout_seconds=None, raise_on_error=False))


class Overrun(BaseException):
    """The worker's own time limit ran out (a BaseException, so library code cannot catch it as an error)."""


_armed = False


def _on_alarm(signum, frame):
    if _armed:
        raise Overrun()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


def _serve(requests, replies) -> None:
    global _armed
    signal.signal(signal.SIGALRM, _on_alarm)
    while True:
        try:
            first, second, seconds = requests.recv()
        except (EOFError, OSError):
            return
        try:
            _armed = True
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                result = equal(first, second)
            finally:
                _armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            reply = ("ok", result)
        except Overrun:
            reply = ("timeout",)
        except BaseException as error:  # noqa: BLE001 - report, keep serving
            reply = ("error", f"{type(error).__name__}: {error}"[:500])
        try:
            replies.send(reply)
        except (BrokenPipeError, OSError):
            return


def main() -> None:
    from multiprocessing.connection import Connection

    requests = Connection(os.dup(0), writable=False)
    replies = Connection(os.dup(1), readable=False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints go to stderr, never into the reply pipe
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a worker stops
    try:
        hello = requests.recv()
    except (EOFError, OSError):
        return  # the parent went away before saying hello
    try:
        sys.path.extend(path for path in hello.get("sys_path", []) if path not in sys.path)
        if hello.get("memory_bytes"):  # a runaway expansion fails with MemoryError instead of filling the host
            import resource

            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            soft = hello["memory_bytes"] if hard == resource.RLIM_INFINITY else min(hello["memory_bytes"], hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        threading.Thread(target=_watch_parent, args=(hello["parent_pid"],), daemon=True).start()
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": this process is the timeout
        equal("\\frac{1}{2}", "0.5")  # build the parsers now, not in the first timed call
    except Exception as error:  # tell the parent why (a missing math-verify is not a killed worker), then exit
        with contextlib.suppress(OSError):
            replies.send(("failed", f"{type(error).__name__}: {error}"[:500], isinstance(error, ImportError)))
        raise
    replies.send(("ready", os.getpid()))
    _serve(requests, replies)


if __name__ == "__main__":
    main()
