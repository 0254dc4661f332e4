"""Answer extraction, normalisation, ``grade`` on Geometry3K, and the sympy worker's time bound and lifecycle."""

from __future__ import annotations

import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from tests.conftest import GEO3K_SAMPLE, ROOT, needs_shared
from vlm_post.data.schema import Example
from vlm_post.rewards import extract_boxed, grade, grading_stats, math_equal, normalize_answer, sympy_pool
from vlm_post.rewards.expression import parse


def test_extract_boxed():
    assert extract_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} then \\boxed {2}") == "2"
    assert extract_boxed("\\fbox{x}") == "x"
    assert extract_boxed("\\boxed{\\boxed{7}}") == "7"
    assert extract_boxed("\\boxed{x = \\boxed{7}}") == "7"
    assert extract_boxed("\\boxed{a^{2} + \\frac{b}{c}}") == "a^{2} + \\frac{b}{c}"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are not structure
    assert extract_boxed("\\boxed{1} and \\boxed{unclosed") == "1"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_boxed(None) is None


def test_extract_boxed_is_linear_on_hostile_text():
    start = time.monotonic()
    assert extract_boxed("\\boxed{" * 3000 + "7" + "}" * 3000) == "7"
    assert extract_boxed("\\boxed{" * 50000) is None
    assert extract_boxed("}" * 50000 + "{" * 50000) is None
    assert time.monotonic() - start < 1.0


def test_normalize_answer_gives_one_key_per_surface_answer():
    same = ["x = 30^\\circ", "30°", "$30$.", " 30 ", "\\text{30}", "30^{\\circ}"]
    assert {normalize_answer(a) for a in same} == {"30"}
    assert normalize_answer("(B)") == normalize_answer("b") == "b"
    assert normalize_answer("\\dfrac{1}{2}") == normalize_answer("\\frac {1} {2}")
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("31") != normalize_answer("30")
    start = time.monotonic()
    for _ in range(2000):
        normalize_answer("m\\angle ABC = \\frac{5\\sqrt{3}}{2} \\text{ cm}")
    assert time.monotonic() - start < 1.0  # cheap: pure string work


def test_math_equal_basic_forms():
    assert math_equal("0.5", "\\frac{1}{2}")
    assert math_equal("x = 13", "13")
    assert math_equal("30^\\circ", "30")
    assert math_equal("\\boxed{12}", "12")
    assert math_equal("\\text{red}", "red")
    assert not math_equal("blue", "red")
    assert not math_equal("", "red")
    assert not math_equal(None, "1")


def test_numeric_tolerance_is_relative_and_configurable():
    assert math_equal("8.66", "5\\sqrt{3}")  # 3e-5 relative: within the default 1e-4
    assert not math_equal("8.7", "5\\sqrt{3}")
    assert math_equal("8.7", "5\\sqrt{3}", rel_tol=1e-2)
    assert not math_equal("0.0012", "0.0013")  # relative, not absolute: small numbers are not all equal
    assert not math_equal("8.66", "5\\sqrt{3}", rel_tol=0)


def test_math_equal_never_raises():
    rng = random.Random(0)
    alphabet = list("0123456789+-*/^_{}()[]=,.!%$\\ xyzabc") + [
        "\\frac",
        "\\sqrt",
        "\\boxed{",
        "\\text{",
        "\\pi",
        "°",
        "√",
        "π",
    ]
    for _ in range(1500):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        assert math_equal(a, b) in (True, False)
    assert math_equal(object(), "1") is False and math_equal(3, "3") is True


@needs_shared
def test_grade_on_the_geometry3k_sample():
    import pandas as pd

    rows = pd.read_parquet(GEO3K_SAMPLE)
    image = Image.new("RGB", (2, 2))
    for row in rows.itertuples():
        choices = list(row.choices)
        example = Example(
            id=str(row.id), images=[image], question=row.problem, answer=row.answer, source="geo3k", choices=choices
        )
        letter = row.ground_truth
        assert grade(f"<think>r</think> \\boxed{{{letter}}}", example) == (True, letter)
        assert grade(f"\\boxed{{({letter}) {row.answer}}}", example)[0]
        assert grade(f"\\boxed{{{row.answer}}}", example)[0]
        wrong = next(i for i, c in enumerate(choices) if c != row.answer)
        assert grade(f"\\boxed{{{chr(65 + wrong)}}}", example)[0] is False
        assert grade(f"\\boxed{{{choices[wrong]}}}", example)[0] is False
        assert grade(f"the answer is {row.answer}", example) == (False, None)  # no box: no answer


def test_grade_maps_choice_letters():
    example = Example(
        id="1",
        images=[Image.new("RGB", (2, 2))],
        question="q",
        answer="5\\sqrt{3}",
        source="s",
        choices=["5", "10", "5\\sqrt{3}"],
    )
    assert grade("<think></think>\\boxed{C}", example) == (True, "C")
    assert grade("\\boxed{\\sqrt{75}}", example) == (True, "\\sqrt{75}")
    assert grade("\\boxed{B}", example) == (False, "B")
    assert grade("\\boxed{(A) 5\\sqrt{3}}", example) == (False, "(A) 5\\sqrt{3}")  # the letter and the text disagree
    assert grade("no answer", example) == (False, None)


def test_importing_rewards_is_cheap():
    heavy = "('sympy', 'torch', 'lightning', 'datasets')"
    code = f"import sys, vlm_post.rewards; print(sorted(m for m in {heavy} if m in sys.modules))"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert time.monotonic() - start < 5.0


# --- the hard time bound ------------------------------------------------------------------------------


def test_a_comparison_that_times_out_is_wrong_and_counted():
    pool = sympy_pool()
    pool.warm_up()
    before = grading_stats().snapshot()
    start = time.monotonic()
    # 0.1 ms is less than any round trip to the worker: this symbolic comparison must time out.
    assert math_equal("x^2 - 1 + 0*y", "(x-1)(x+1)", timeout_s=1e-4) is False
    assert time.monotonic() - start < 2.0
    after = grading_stats().snapshot()
    assert after["timeouts"] - before["timeouts"] == 1
    assert math_equal("x^2 - 1", "(x-1)(x+1)")  # with the default timeout it is equal


def test_a_hung_worker_is_killed_within_the_timeout_in_several_threads():
    pool, results = sympy_pool(), {}
    tree = parse("x")
    restarts = grading_stats().restarts

    def hang(thread: int) -> None:
        start = time.monotonic()
        equal = pool.compare(tree, tree, 1e-4, 0.5, sleep=30)  # the worker's test hook: a 30 s "comparison"
        results[thread] = (equal, time.monotonic() - start)

    threads = [threading.Thread(target=hang, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 4
    assert all(equal is None for equal, _ in results.values())  # None: timed out
    assert max(elapsed for _, elapsed in results.values()) < 2.0
    assert grading_stats().restarts - restarts >= 2  # every worker that hung was killed and replaced
    assert pool.compare(tree, parse("x + 0"), 1e-4, 5.0) is True  # replacements work


def _symbolic_in_child(queue) -> None:
    queue.put(math_equal("(x+1)^2", "x^2 + 2x + 1"))


def test_a_forked_child_gets_its_own_workers():
    sympy_pool().warm_up()  # the parent holds a worker when it forks, as a trainer would
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_symbolic_in_child, args=(queue,))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0 and queue.get(timeout=1) is True
    assert math_equal("(x+2)^2", "x^2 + 4x + 4")  # the parent's workers are untouched


def test_close_leaves_no_worker_processes():
    pool = sympy_pool()
    pool.warm_up()
    processes = [worker.process for worker in pool._all]
    assert processes
    pool.close()
    assert all(process.poll() is not None for process in processes)
    assert math_equal("2x", "x + x")  # started again on demand


def test_workers_exit_with_their_parent():
    code = (
        "import os, vlm_post.rewards as r; r.sympy_pool().warm_up();"
        "print([w.process.pid for w in r.sympy_pool()._all][0], flush=True); os._exit(0)"  # no atexit clean-up
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"sympy worker {pid} outlived its parent")


def test_numbers_beyond_float_range_are_never_equal_by_overflow():
    """float("1e400") is inf: two different huge numbers, or a huge one and infinity, must not compare equal."""
    assert not math_equal("1e400", "2e400")
    assert not math_equal("-1e400", "1e400")
    assert not math_equal("\\infty", "1e999") and not math_equal("1e999", "\\infty")
    assert math_equal("1e400", "1e400") and math_equal("1e400", "1.00001e400")  # exactly, within rel_tol
    assert math_equal("\\infty", "\\infty")
