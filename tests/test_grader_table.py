"""The grader table: (prediction, reference, expected) pairs in the answer formats of Geometry3K and MathVista.

References marked ``geo3k`` / ``mathvista`` are real answers (or choice texts) from
the shared samples, checked below; predictions are the forms models write.
``tools/compare_graders.py`` runs math-verify on this same table (docs/grading.md).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import GEO3K_SAMPLE, MATHVISTA_TESTMINI, needs_shared
from vlm_post.rewards import grading_stats, math_equal

pytestmark = pytest.mark.fast

TIME_BOUND_S = 2.0
T, F = True, False

# (prediction, reference, expected, category). Category "geo3k"/"mathvista": the reference is real data.
TABLE: list[tuple[str, str, bool, str]] = [
    # --- Geometry3K answers (the shared sample) -----------------------------------------------------
    ("\\boxed{80}", "80", T, "geo3k"),
    ("80^\\circ", "80", T, "geo3k"),
    ("x = 13", "13", T, "geo3k"),
    ("13.0", "13", T, "geo3k"),
    ("12", "13", F, "geo3k"),
    ("\\boxed{48}", "48", T, "geo3k"),
    ("48.5", "48", F, "geo3k"),
    ("5\\sqrt{3}", "5\\sqrt{3}", T, "geo3k"),
    ("\\sqrt{75}", "5\\sqrt{3}", T, "geo3k"),
    ("8.66", "5\\sqrt{3}", T, "geo3k"),
    ("5 \\sqrt 3", "5\\sqrt{3}", T, "geo3k"),
    ("\\frac{10\\sqrt{3}}{2}", "5\\sqrt{3}", T, "geo3k"),
    ("5\\sqrt{2}", "5\\sqrt{3}", F, "geo3k"),
    ("5", "5\\sqrt{3}", F, "geo3k"),
    ("10 \\text{ units}", "10", T, "geo3k"),
    ("13.5", "10", F, "geo3k"),
    ("120°", "120", T, "geo3k"),
    ("\\angle ABC = 120^{\\circ}", "120", T, "geo3k"),
    ("x = 22", "22", T, "geo3k"),
    ("20", "22", F, "geo3k"),
    ("\\frac { 2 \\sqrt { 2 } } { 5 }", "\\frac{2\\sqrt{2}}{5}", T, "geo3k"),
    ("\\dfrac{2\\sqrt{2}}{5}", "\\frac{2\\sqrt{2}}{5}", T, "geo3k"),
    ("\\frac{2}{5}\\sqrt{2}", "\\frac{2\\sqrt{2}}{5}", T, "geo3k"),
    ("\\frac{\\sqrt{8}}{5}", "\\frac{2\\sqrt{2}}{5}", T, "geo3k"),
    ("0.5657", "\\frac{2\\sqrt{2}}{5}", T, "geo3k"),
    ("\\frac{\\sqrt{2}}{5}", "\\frac{2\\sqrt{2}}{5}", F, "geo3k"),
    ("\\frac{\\sqrt{5}}{5}", "\\frac{2\\sqrt{2}}{5}", F, "geo3k"),
    ("16.0", "16", T, "geo3k"),
    ("32", "16", F, "geo3k"),
    # --- MathVista answers and choice texts (testmini) ----------------------------------------------
    ("\\frac{20}{3}", "\\frac { 20 } { 3 }", T, "mathvista"),
    ("6.6667", "\\frac { 20 } { 3 }", T, "mathvista"),
    ("22/3", "\\frac { 20 } { 3 }", F, "mathvista"),
    ("\\frac{40}{3}", "\\frac { 40 } { 3 }", T, "mathvista"),
    ("10\\sqrt{3}", "10 \\sqrt { 3 }", T, "mathvista"),
    ("6\\sqrt{5}", "6 \\sqrt { 5 }", T, "mathvista"),
    ("6\\sqrt{3}", "6 \\sqrt { 5 }", F, "mathvista"),
    ("2\\sqrt{3}", "2*\\sqrt{3}", T, "mathvista"),
    ("2\\sqrt{3}", "2√{3}", T, "mathvista"),
    ("\\sqrt{2}", "√{2}", T, "mathvista"),
    ("\\frac{3\\sqrt{5}}{2}", "\\frac{3√{5}}{2}", T, "mathvista"),
    ("\\frac{\\sqrt{15}}{2}", "\\frac{3√{5}}{2}", F, "mathvista"),
    ("2-\\frac{\\sqrt{3}}{3}", "2-\\frac{√{3}}{3}", T, "mathvista"),
    ("\\frac{16\\pi}{5}", "16*\\pi/5", T, "mathvista"),
    ("3.2\\pi", "16*\\pi/5", T, "mathvista"),
    ("10.053", "16*\\pi/5", T, "mathvista"),
    ("\\frac{32\\pi}{5}", "16*\\pi/5", F, "mathvista"),
    ("9\\pi", "9π", T, "mathvista"),
    ("28.274", "9π", T, "mathvista"),
    ("6\\pi", "9π", F, "mathvista"),
    ("4\\pi \\text{ cm}", "4πcm", T, "mathvista"),
    ("\\frac{5\\pi}{3}", "\\frac { 5 } { 3 } \\pi", T, "mathvista"),
    ("\\frac{3\\pi}{5}", "\\frac { 5 } { 3 } \\pi", F, "mathvista"),
    ("0.75", "\\frac{3}{4}", T, "mathvista"),
    ("\\frac{4}{3}", "\\frac{4}{5}", F, "mathvista"),
    ("\\frac{3}{11}", "3/11", T, "mathvista"),
    ("145", "145°", T, "mathvista"),
    ("145^{\\circ}", "145°", T, "mathvista"),
    ("135°", "145°", F, "mathvista"),
    ("60", "60*\\degree", T, "mathvista"),
    ("17.5", "17.5°", T, "mathvista"),
    ("20", "20cm", T, "mathvista"),
    ("20 \\text{ cm}", "20cm", T, "mathvista"),
    ("\\frac{20}{7} \\text{ cm}", "\\frac{20}{7}cm", T, "mathvista"),
    ("\\frac{20}{3}", "\\frac{20}{7}cm", F, "mathvista"),
    ("0.5 \\text{ cm}^2", "0.5cm2", T, "mathvista"),
    ("160\\sqrt{3} m", "160√{3}m", T, "mathvista"),
    ("160", "160√{3}m", F, "mathvista"),
    ("20\\sqrt{2}", "20√{2}海里", T, "mathvista"),
    ("6+14\\sqrt{3}", "(6+14√{3})m", T, "mathvista"),
    ("\\text{Yes}", "Yes", T, "mathvista"),
    ("yes", "Yes", T, "mathvista"),
    ("No", "Yes", F, "mathvista"),
    ("\\text{smaller than}", "smaller than", T, "mathvista"),
    ("larger than", "smaller than", F, "mathvista"),
    ("\\text{LLaVA-13B (LLaMA-2)}", "LLaVA-13B (LLaMA-2)", T, "mathvista"),
    ("125a^2 + 250", "125*a^2 + 250", T, "mathvista"),
    ("125(a^2+2)", "125*a^2 + 250", T, "mathvista"),
    ("25a^2 + 50", "125*a^2 + 250", F, "mathvista"),
    ("-k+60", "60-k", T, "mathvista"),
    ("60+k", "60-k", F, "mathvista"),
    ("120-2k", "120-2*k", T, "mathvista"),
    ("4:30", "4:30", T, "mathvista"),
    ("9:30", "4:30", F, "mathvista"),
    ("04/02/2005", "04/02/2005", T, "mathvista"),
    ("04/03/2005", "04/02/2005", F, "mathvista"),
    ("\\boxed{2019}", "2019", T, "mathvista"),
    ("15,017", "15017", T, "mathvista"),
    ("−47", "-47", T, "mathvista"),
    ("47", "-47", F, "mathvista"),
    ("1.20", "1.2", T, "mathvista"),
    ("1.25", "1.2", F, "mathvista"),
    ("\\frac{129}{50}", "2.58", T, "mathvista"),
    ("0", "0.0", T, "mathvista"),
    ("4.3", "-4.3", F, "mathvista"),
    ("[0,2,0,2,1,7,1,2,0,3,0,6]", "[0, 2, 0, 2, 1, 7, 1, 2, 0, 3, 0, 6]", T, "mathvista"),
    ("[2014, 2016]", "[2014, 2016]", T, "mathvista"),
    ("[2016, 2014]", "[2014, 2016]", F, "mathvista"),
    ("[2014]", "[2014, 2016]", F, "mathvista"),
    ("[2014, 2016] \\text{ years}", "[2014, 2016]", T, "mathvista"),
    ("R, D", "R, D, N", F, "mathvista"),  # the N is a letter here, not newtons
    ("R, D, N", "R, D, N", T, "mathvista"),
    # --- other forms the issue lists ---------------------------------------------------------------
    ("0.5", "\\frac{1}{2}", T, "form"),
    ("\\frac12", "0.5", T, "form"),
    ("\\frac32", "1.5", T, "form"),
    ("\\tfrac{3}{2}", "\\frac{3}{2}", T, "form"),
    ("1\\frac{1}{2}", "1.5", T, "form"),
    ("-0.5", "-\\frac{1}{2}", T, "form"),
    ("\\frac{-1}{2}", "-\\frac{1}{2}", T, "form"),
    ("0.33333", "\\frac{1}{3}", T, "form"),
    ("0.33", "\\frac{1}{3}", F, "form"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", T, "form"),
    ("2\\sqrt{221}", "\\sqrt{884}", T, "form"),
    ("\\sqrt[3]{27}", "3", T, "form"),
    ("30^\\circ", "30", T, "form"),
    ("30°", "30", T, "form"),
    ("30 degrees", "30", T, "form"),
    ("\\text{12 cm}", "12", T, "form"),
    ("x=13", "13", T, "form"),
    ("AB = 5\\sqrt{3}", "5\\sqrt{3}", T, "form"),
    ("m \\angle 2 = 62", "62", T, "form"),
    ("5\\sqrt{3} \\approx 8.66", "5\\sqrt{3}", T, "form"),
    ("2\\pi", "6.2832", T, "form"),
    ("\\pi", "3", F, "form"),
    ("25\\%", "0.25", T, "form"),
    ("25%", "25", T, "form"),
    ("1.2 \\times 10^{3}", "1200", T, "form"),
    ("1,000", "1000", T, "form"),
    ("(B)", "B", T, "form"),
    ("C", "B", F, "form"),
    ("\\{1, 2\\}", "\\{2, 1\\}", T, "form"),  # sets and bare solution lists are unordered
    ("3, 2", "2, 3", T, "form"),
    ("x = 2 \\text{ or } x = 3", "2, 3", T, "form"),
    ("x \\in [1, 2]", "[1, 2]", T, "form"),
    ("(2, 1)", "(1, 2)", F, "form"),  # a point is ordered
    ("2(x+1)", "2x+2", T, "form"),
    ("x^2-1", "(x-1)(x+1)", T, "form"),
    ("x^2+1", "(x-1)(x+1)", F, "form"),
    ("\\frac{x}{2}", "0.5x", T, "form"),
    ("\\sin^2 x + \\cos^2 x", "1", T, "form"),
    ("\\boxed{\\frac{1}{2}}", "0.5", T, "form"),
    ("The answer is \\boxed{13}.", "13", T, "form"),
    ("\\fbox{13}", "13", T, "form"),
    ("\\boxed {13}", "13", T, "form"),
    ("\\boxed{\\boxed{13}}", "13", T, "form"),
    ("\\boxed{12} so finally \\boxed{13}", "13", T, "form"),
    ("\\boxed{13} no wait \\boxed{12}", "13", F, "form"),
    ("", "13", F, "form"),
    ("\\boxed{}", "13", F, "form"),
    # --- adversarial: wrong, and each within TIME_BOUND_S -------------------------------------------
    ("9^{9^{9^{9}}}", "1", F, "adversarial"),
    ("9^{9^{9^{9}}}", "9^{9^{9^{10}}}", F, "adversarial"),
    ("2^{2^{2^{2^{2^{2}}}}}", "2", F, "adversarial"),
    ("(" * 10000 + "1" + ")" * 10000, "2", F, "adversarial"),
    ("\\sqrt{" * 200 + "2" + "}" * 200, "2", F, "adversarial"),
    ("\\boxed{" * 3000 + "2" + "}" * 3000, "1", F, "adversarial"),
    ("x^{99999999}", "x", F, "adversarial"),
    ("(x+1)^{1000000}", "x", F, "adversarial"),
    ("(x+y+z)^{200}", "(x+y+z)^{200}+1", F, "adversarial"),
    ("1000000!", "5", F, "adversarial"),
    ("9" * 5000, "1", F, "adversarial"),
    ("a" * 100000, "a", F, "adversarial"),
    ("\\frac{1}{0}", "1", F, "adversarial"),
    ("-" * 151 + "1", "1", F, "adversarial"),  # an odd number of minus signs: -1
]


def test_table_is_large_and_covers_every_category():
    assert len(TABLE) >= 100
    categories = {row[3] for row in TABLE}
    assert categories == {"geo3k", "mathvista", "form", "adversarial"}
    assert sum(row[2] for row in TABLE) >= 40 and sum(not row[2] for row in TABLE) >= 40  # both verdicts well covered


@needs_shared
def test_real_references_occur_in_the_shared_data():
    import pandas as pd

    geo = pd.read_parquet(GEO3K_SAMPLE)
    geo_texts = set(geo["answer"]) | {c for choices in geo["choices"] for c in choices}
    rows = json.loads(MATHVISTA_TESTMINI.read_text()).values()
    vista_texts = {r["answer"] for r in rows} | {c for r in rows for c in (r["choices"] or [])}
    for prediction, reference, _, category in TABLE:
        if category == "geo3k":
            assert reference in geo_texts, reference
        elif category == "mathvista":
            assert reference in vista_texts, reference


@pytest.mark.parametrize(
    ("prediction", "reference", "expected", "category"), TABLE, ids=[f"{r[3]}-{i}" for i, r in enumerate(TABLE)]
)
def test_grader_table(prediction, reference, expected, category):
    start = time.monotonic()
    assert math_equal(prediction, reference) is expected
    assert time.monotonic() - start < TIME_BOUND_S


def test_adversarial_inputs_from_several_threads_at_once():
    rows = [row for row in TABLE if row[3] == "adversarial"]
    results: dict[int, tuple[bool, float]] = {}

    def grade_all(thread: int) -> None:
        for index, (prediction, reference, _, _) in enumerate(rows):
            start = time.monotonic()
            equal = math_equal(prediction + " " * (thread + 1), reference)  # distinct inputs: no cache hits
            results[thread * 1000 + index] = (equal, time.monotonic() - start)

    threads = [threading.Thread(target=grade_all, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 4 * len(rows)
    assert not any(equal for equal, _ in results.values())
    assert max(elapsed for _, elapsed in results.values()) < TIME_BOUND_S


def test_adversarial_inputs_are_rejected_cheaply_and_counted():
    before = grading_stats().snapshot()
    start = time.monotonic()
    assert not math_equal("9^{9^{9^{9}}}\t", "9^{9^{9^{10}}}")  # a tab: not in the cache from other tests
    assert not math_equal("(" * 10000 + "1" + ")" * 10000 + "\t", "1")
    assert time.monotonic() - start < 0.1  # the pre-screen, not the timeout, stops these
    after = grading_stats().snapshot()
    assert after["rejected"] - before["rejected"] == 2
    assert after["comparisons"] - before["comparisons"] == 2
