"""optpo_jax/tasks/grading.py (and grading_worker.py): math equivalence in worker processes under hostile input."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from optpo_jax.tasks import grading
from optpo_jax.tasks.grading import GradingPool
from optpo_jax.tasks.grading_worker import parse_whole
from optpo_jax.tasks.math import (
    MathEquivalence,
    MathTask,
)
from tests.tasks.fakes import FakeTokenizer

ROOT = Path(__file__).resolve().parents[2]


SLOW_PAIR = ("(1+x)^{1000}", "(1+x)^{1001}")  # math-verify expands both: ~16 s unbounded


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_equivalence_works_off_the_main_thread():
    """Item 8: from a threading.Thread, 0.5 equals \\frac{1}{2} (math-verify's SIGALRM limit
    made it silently "not equal" there), and a slow pair stops at the deadline with a timeout counted."""
    equal = MathEquivalence(timeout_seconds=1)
    results = {}

    def grade():
        results["half"] = equal("0.5", "\\frac{1}{2}")
        results["third"] = equal("\\frac{1}{3}", "0.5")
        start = time.perf_counter()
        results["slow"] = equal(*SLOW_PAIR)
        results["slow_seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert results["half"] is True and results["third"] is False
    assert results["slow"] is False and results["slow_seconds"] < 1 + 1.5
    assert equal.timeouts == 1 and equal.errors == 0
    start = time.perf_counter()
    assert equal(*SLOW_PAIR) is False  # cached: a repeated pathological answer costs one timeout
    assert time.perf_counter() - start < 0.1 and equal.timeouts == 1


def test_many_threads_share_the_pool():
    """Item 8: concurrent calls from several threads all get the right answer."""
    equal = MathEquivalence(timeout_seconds=2)
    pairs = [("0.5", "\\frac{1}{2}"), ("\\frac{2}{3}", "0.5"), ("\\sqrt{4}", "2"), ("x+1", "1+x"), ("3", "\\pi")] * 4
    assert equal.many(pairs) == [True, False, True, True, False] * 4
    assert equal.timeouts == 0


SWALLOWED_ALARM = textwrap.dedent(r"""
    import gc, json, signal, sys, time
    import jax  # registers its own gc callback, as in training
    from optpo_jax.tasks.math import MathEquivalence

    equal = MathEquivalence(timeout_seconds=1)
    assert equal("0.5", "\\frac{1}{2}")  # warm (the grading worker, or math-verify's parsers)

    def collector(phase, info):
        # While an ITIMER_REAL alarm is pending in this process, let it fire inside this gc
        # callback: Python prints "Exception ignored in ..." and drops the timeout exception.
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        if phase == "start" and remaining > 0:
            time.sleep(remaining + 0.05)

    gc.callbacks.append(collector)
    start = time.perf_counter()
    result = equal(sys.argv[1], sys.argv[2])
    print(json.dumps({"result": result, "seconds": time.perf_counter() - start, "timeouts": equal.timeouts}))
""")


def test_a_swallowed_alarm_cannot_unbound_a_check():
    """Item 8: a timeout exception swallowed by a gc callback (as JAX's can) does not let a
    check run on: the call still returns at the deadline and counts a timeout."""
    process = subprocess.run([sys.executable, "-c", SWALLOWED_ALARM, *SLOW_PAIR], check=False, capture_output=True,
                             text=True, timeout=40, cwd=ROOT)
    assert process.returncode == 0, process.stderr[-2000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report["result"] is False and report["timeouts"] == 1
    assert report["seconds"] < 1 + 1.5, report


def test_a_stuck_worker_is_killed_and_replaced():
    """Item 8: a worker that does not answer (its own timer cannot fire: SIGSTOP) is killed at
    seconds + grace, the call reports a timeout, and a fresh worker takes its place."""
    with GradingPool(workers=1, grace_seconds=0.3) as pool:
        assert pool.equal("0.5", "\\frac{1}{2}", 2.0) == (True, "ok")
        [stuck] = pool.pids
        os.kill(stuck, signal.SIGSTOP)
        start = time.perf_counter()
        assert pool.equal("0.5", "\\frac{1}{2}", 0.5) == (False, "timeout")
        assert time.perf_counter() - start < 0.5 + 0.3 + 0.7
        assert pool.kills == 1 and not alive(stuck)
        [fresh] = pool.pids
        assert fresh != stuck
        assert pool.equal("0.5", "\\frac{1}{2}", 2.0) == (True, "ok")
    assert wait_until(lambda: not alive(fresh), 3)


POOL_USER = textwrap.dedent(r"""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("grading", sys.argv[1])  # stdlib only: no JAX import
    grading = importlib.util.module_from_spec(spec)
    sys.modules["grading"] = grading
    spec.loader.exec_module(grading)
    pool = grading.default_pool()
    assert pool.equal("0.5", "\\frac{1}{2}", 2.0) == (True, "ok")
    print(" ".join(map(str, pool.pids)), flush=True)
    if sys.argv[2] == "hang":
        time.sleep(60)
""")


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_workers_do_not_outlive_their_parent(ending):
    """Item 8: grading workers stop when the process that started them exits normally
    (without closing the pool) or is killed with SIGKILL."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    process = subprocess.Popen([sys.executable, "-c", POOL_USER, str(Path(grading.__file__)),
                                "hang" if ending == "sigkill" else "exit"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
        assert len(pids) == grading.DEFAULT_WORKERS and all(alive(pid) for pid in pids)
        if ending == "sigkill":
            process.kill()
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 5), [pid for pid in pids if alive(pid)]


def test_closing_the_default_pool_stops_its_workers_and_a_new_one_starts_on_demand():
    """Item 8: close_default_pool() stops the shared workers; the next check starts new ones."""
    equal = MathEquivalence()
    assert equal("0.5", "\\frac{1}{2}")
    pids = grading.default_pool().pids
    grading.close_default_pool()
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 3)
    assert equal("0.25", "\\frac{1}{4}")
    assert set(grading.default_pool().pids).isdisjoint(pids)


def test_fast_path_needs_no_worker():
    """Item 8: identical normalised strings and two different integers are decided in-process."""
    pool = GradingPool(workers=1)  # never started: a call that reached it would start a worker
    equal = MathEquivalence(pool=pool)
    assert equal("025", "25") and equal("\\dfrac{1}{2}", "\\frac{1}{2}") and equal("142.0", "142")
    assert not equal("25", "250") and not equal("-3", "3")
    assert equal.calls == 0 and pool.pids == []
    pool.close()
    with pytest.raises(ValueError, match="timeout_seconds"):
        MathEquivalence(timeout_seconds=0)


def test_junk_after_a_number_is_not_that_number():
    """Item 10: math-verify used to read the first number out of unparseable LaTeX."""
    equal = MathEquivalence(timeout_seconds=2)
    for reference, junk in [("2", "\\sin 2 \\cup"), ("\\frac{1}{2}", "\\log 0.5 \\times"), ("2", "2 \\cup"),
                            ("2", "2 +"), ("\\frac{1}{2}", "\\frac{1}{2} \\cap"), ("5", "= 5 \\times")]:
        assert not equal(reference, junk), (reference, junk)
        assert not equal(junk, reference), (junk, reference)
        assert len(parse_whole(junk)) < 2  # no expression: only the normalised string
    for reference, same in [("2", "1+1"), ("\\frac{1}{2}", "0.5"), ("2", "x = 2"), ("\\{1,2\\}", "\\{2,1\\}"),
                            ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"), ("50\\%", "0.5"),
                            ("2", "= 2"), ("2", "2~\\text{km}"), ("2", "\\left. 2 \\right."), ("2", "x=2,")]:
        assert equal(reference, same), (reference, same)
    assert equal.timeouts == 0


def test_random_latex_matches_a_reference_only_when_it_parses_as_a_whole():
    """Item 10: random LaTeX strings that grade equal to "2" or "\\frac{1}{2}" are whole expressions."""
    rng = random.Random(1)
    pieces = ["\\sin", "\\log", "\\cup", "\\times", "2", "0.5", "\\frac{1}{2}", "+", "-", "(", ")", "x", "1", " ", "^",
              "\\pi", "=", ","]
    texts = sorted({"".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))) for _ in range(150)})
    pairs = [(reference, text) for text in texts for reference in ("2", "\\frac{1}{2}")]
    equal = MathEquivalence(timeout_seconds=1)
    matched = [pair for pair, same in zip(pairs, equal.many(pairs), strict=True) if same]
    assert matched  # e.g. "0.5", "+0.5", "1+1"
    for reference, text in matched:
        assert len(parse_whole(text)) == 2, (reference, text)  # an expression, read from the whole string


def test_a_finite_answer_never_equals_an_infinite_one():
    """Item 10: math-verify's symbolic check sometimes finds 1/2 - 2*oo "zero" (sympy's
    simplify on infinities): about 2 in 170 such pairs graded equal, differently per process."""
    pairs = [pair for k in range(2, 202) for pair in [("\\frac{1}{2}", f"\\infty{k}"), (str(k), f"{k}\\infty"),
                                                       ("\\frac{1}{3}", f"-\\infty {k}")]]
    equal = MathEquivalence(timeout_seconds=2)
    assert [pair for pair, same in zip(pairs, equal.many(pairs), strict=True) if same] == []
    assert equal("(2,\\infty)", "(2, \\infty)") and equal("\\infty", "+\\infty") and not equal("\\infty", "-\\infty")


@pytest.fixture
def doom(monkeypatch):
    """While ``doom["start"]`` is set, every worker a pool starts is SIGKILLed at once; while
    ``doom["check"]`` is set, every worker is SIGKILLed right after a pair is sent to it."""
    switches = {"start": False, "check": False}
    spawn = GradingPool._spawn

    def spawn_doomed(pool):
        worker = spawn(pool)
        if switches["start"]:
            os.kill(worker.pid, signal.SIGKILL)
        send = worker.requests.send

        def send_then_die(message):
            doomed = switches["check"]
            if doomed:  # stopped first, so it cannot answer before it dies
                os.kill(worker.pid, signal.SIGSTOP)
            send(message)
            if doomed:
                os.kill(worker.pid, signal.SIGKILL)

        worker.requests.send = send_then_die
        return worker

    monkeypatch.setattr(GradingPool, "_spawn", spawn_doomed)
    return switches


def test_a_worker_killed_mid_check_is_retried_and_the_verdict_stands():
    """Issue 25: a worker SIGKILLed with a pair in flight made that pair "error", read and
    cached as "not equal" (a vote split 4-0 became 3-1); the pair is now sent to a fresh worker."""
    with GradingPool(workers=1) as pool:
        equal = MathEquivalence(timeout_seconds=5, pool=pool)
        assert equal("0.25", "\\frac{1}{4}")  # warm
        [victim] = pool.pids
        os.kill(victim, signal.SIGSTOP)  # it cannot answer: the next pair waits in its pipe
        results = []
        thread = threading.Thread(target=lambda: results.append(equal("0.5", "\\frac{1}{2}")))
        thread.start()
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=20)
        assert not thread.is_alive()
        assert results == [True]
        assert equal.errors == 0 and equal.timeouts == 0 and equal.calls == 2
        assert pool.deaths == 1 and pool.last_death == "killed by signal 9 (SIGKILL)"
        assert not alive(victim) and victim not in pool.pids
        assert pool.equal("\\frac{2}{3}", "0.5", 5) == (False, "ok")  # the fresh worker serves on


def test_a_pair_whose_worker_always_dies_is_an_error_never_a_cached_verdict(doom):
    """Issue 25: after its retries (2), a pair whose worker dies every time is an error: "not
    equal" for that call only (never cached), counted in errors and in the task's counters
    (equivalence_errors / grader_errors in metrics.jsonl)."""
    from optpo_jax.train.metrics import task_counters

    with GradingPool(workers=1) as pool:
        task = MathTask(FakeTokenizer(), multiple_choice=True)  # multiple choice: starts no default pool
        task.equivalent = MathEquivalence(timeout_seconds=5, pool=pool)
        task.grader = MathEquivalence(timeout_seconds=5, pool=pool)
        doom["check"] = True
        assert task.equivalent("0.5", "\\frac{1}{2}") is False
        assert task.equivalent.errors == 1 and task.equivalent.timeouts == 0
        doom["check"] = False
        assert task.equivalent("0.5", "\\frac{1}{2}") is True  # checked again: the error was not cached
        assert task.equivalent.errors == 1 and task.equivalent.calls == 2
        assert pool.deaths == 3 and pool.last_death == "killed by signal 9 (SIGKILL)"
        counters = task_counters(task)
        assert counters["equivalence_errors"] == 1 and counters["grader_errors"] == 0
        assert counters["equivalence_timeouts"] == 0 and counters["grader_timeouts"] == 0


def test_a_worker_killed_while_starting_is_replaced():
    """Issue 25: a worker killed before it was ready raised GradingError out of equal()
    ("is math-verify installed?"); the call now starts another and answers."""
    with GradingPool(workers=1) as pool:
        [victim] = pool.start().pids
        os.kill(victim, signal.SIGKILL)
        assert pool.equal("0.5", "\\frac{1}{2}", 5) == (True, "ok")
        assert pool.deaths == 1 and pool.last_death == "killed by signal 9 (SIGKILL)"


def test_a_worker_that_keeps_dying_while_starting_is_named_as_such(doom):
    """Issue 25: when every try's worker dies while starting, the error says it was killed
    (signal 9), not that math-verify may be missing."""
    doom["start"] = True
    with GradingPool(workers=1) as pool, pytest.raises(grading.GradingError) as raised:
        pool.equal("0.5", "\\frac{1}{2}", 5)
    message = str(raised.value)
    assert "died while starting: killed by signal 9 (SIGKILL)" in message, message
    assert "math-verify" not in message, message
    assert isinstance(raised.value, grading.WorkerDied) and pool.deaths == 3


def test_a_worker_that_cannot_import_math_verify_says_so(tmp_path, monkeypatch):
    """Issue 25: a real import failure is reported by the worker itself, named, and not retried."""
    (tmp_path / "math_verify").mkdir()
    (tmp_path / "math_verify" / "__init__.py").write_text("raise ImportError('math-verify is broken here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker finds this one first
    with GradingPool(workers=1) as pool, pytest.raises(grading.GradingError) as raised:
        pool.equal("0.5", "\\frac{1}{2}", 5)
    message = str(raised.value)
    assert "could not import math-verify (ImportError: math-verify is broken here)" in message, message
    assert "is math-verify installed" in message and pool.deaths == 0
