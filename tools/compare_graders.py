"""Compare our grader (vlm_post.rewards.math_equal) with math-verify on the same answer table.

math-verify is never a dependency of vlm_post: install it in a throwaway venv and
point this script at that interpreter:

    python3 -m venv /tmp/mvenv && /tmp/mvenv/bin/pip install math-verify
    OMP_NUM_THREADS=1 .venv/bin/python tools/compare_graders.py --math-verify-python /tmp/mvenv/bin/python

The table is ``tests/test_grader_table.py::TABLE`` (Geometry3K and MathVista answer
formats, plus adversarial inputs); then, when the shared data is present, every
MathVista free-form answer in five surface forms; then ``OTHER_MATH``, forms from
competition math outside our data sets. math-verify runs in a child
process fed one pair at a time; a pair it does not finish in ``--hang-after``
seconds is recorded as hung and the child restarted. The figures go in docs/grading.md.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# --- the math-verify side: runs under the throwaway venv's interpreter ---------------------------------


def _math_verify_worker(strategy: str) -> None:
    """Read {"prediction", "reference"} lines, answer {"equal", "seconds"} lines."""
    from math_verify import parse, verify

    def wrap(text: str) -> str:
        if strategy == "raw" or "\\boxed" in text:
            return text
        return f"${text}$" if strategy == "dollars" else f"\\boxed{{{text}}}"

    print("ready", flush=True)
    for line in sys.stdin:
        pair = json.loads(line)
        start = time.monotonic()
        try:
            gold = parse(wrap(pair["reference"]))
            answer = parse(wrap(pair["prediction"]))
            equal = bool(verify(gold, answer))
        except Exception as error:  # noqa: BLE001 - recorded, like a wrong answer
            equal = False
            print(f"# {type(error).__name__}: {error}"[:200], file=sys.stderr)
        print(json.dumps({"equal": equal, "seconds": time.monotonic() - start}), flush=True)


class _Child:
    """A math-verify worker process with a per-pair deadline."""

    def __init__(self, python: str, strategy: str):
        command = [python, str(Path(__file__).resolve()), "--math-verify-worker", strategy]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if self.lines.get(timeout=120) != "ready":
            raise RuntimeError("math-verify worker did not start")

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def ask(self, prediction: str, reference: str, hang_after: float) -> dict | None:
        self.process.stdin.write(json.dumps({"prediction": prediction, "reference": reference}) + "\n")
        self.process.stdin.flush()
        try:
            return json.loads(self.lines.get(timeout=hang_after))
        except queue.Empty:
            return None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def run_math_verify(pairs: list[tuple[str, str]], python: str, strategy: str, hang_after: float) -> list[dict]:
    results, child = [], _Child(python, strategy)
    for prediction, reference in pairs:
        wall = time.monotonic()
        reply = child.ask(prediction, reference, hang_after)
        if reply is None:
            child.kill()
            results.append({"equal": False, "seconds": time.monotonic() - wall, "hung": True})
            child = _Child(python, strategy)
        else:
            results.append({**reply, "seconds": time.monotonic() - wall, "hung": False})
    child.kill()
    return results


# --- our side ---------------------------------------------------------------------------------------------


def run_ours(pairs: list[tuple[str, str]]) -> list[dict]:
    from vlm_post.rewards import clear_cache, math_equal, sympy_pool

    sympy_pool().warm_up()  # the one-off worker start is not a comparison's cost
    results = []
    for prediction, reference in pairs:
        clear_cache()  # time the comparison itself, not a cache hit on a repeated pair
        start = time.monotonic()
        equal = math_equal(prediction, reference)
        results.append({"equal": equal, "seconds": time.monotonic() - start, "hung": False})
    return results


def mathvista_free_form_rows() -> list[tuple[str, str, bool, str]]:
    """Each MathVista free-form gold answer in five surface forms that must grade as equal."""
    from tests.conftest import MATHVISTA_TESTMINI

    if not MATHVISTA_TESTMINI.is_file():
        return []
    rows = []
    for row in json.loads(MATHVISTA_TESTMINI.read_text()).values():
        if row["question_type"] != "free_form":
            continue
        gold, unit = row["answer"], row["unit"] or "cm"
        for form in (
            f"\\boxed{{{gold}}}",
            f"x = {gold}",
            f"{gold} \\text{{ {unit}}}",
            f"${gold}$",
            f"The answer is \\boxed{{{gold}}}.",
        ):
            rows.append((form, gold, True, "mathvista-free-form"))
    return rows


# Competition-math forms outside Geometry3K/MathVista, where math-verify's LaTeX coverage is wider; not part of
# the test table (ours gets several wrong, see docs/grading.md), reported as "other-math".
OTHER_MATH = [
    ("\\{1, 2\\}", "\\{2, 1\\}", True), ("(1, 2]", "(1, 2]", True), ("(1,2]", "[1,2]", False),
    ("2y = 4x + 2", "y = 2x + 1", True), ("x \\in [1, 2]", "[1, 2]", True), ("e^{i\\pi}", "-1", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("x = 2 \\text{ or } x = 3", "2, 3", True), ("3, 2", "2, 3", True), ("\\frac{\\pi}{6}", "30^\\circ", True),
    ("1 < x < 2", "(1, 2)", True), ("10^{10^{10}} - 10^{10^{10}}", "0", True), ("3i + 4", "4 + 3i", True),
    ("\\sqrt{-4}", "2i", True), ("0.5x", "\\frac{x}{2}", True), ("a^2 + 2ab + b^2", "(a+b)^2", True),
]  # fmt: skip


_NOT_TABLE = ("mathvista-free-form", "other-math")


def summarise(name: str, rows: list[tuple[str, str, bool, str]], results: list[dict]) -> dict:
    by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    false_pos = false_neg = hung = 0
    for (_, _, expected, category), result in zip(rows, results):
        by_category[category][0] += result["equal"] == expected
        by_category[category][1] += 1
        false_pos += result["equal"] and not expected
        false_neg += expected and not result["equal"]
        hung += result["hung"]
    seconds = [r["seconds"] for r in results]
    table_rows = [i for i, row in enumerate(rows) if row[3] not in _NOT_TABLE]
    return {
        "grader": name,
        "table_correct": sum(by_category[c][0] for c in by_category if c not in _NOT_TABLE),
        "table_total": len(table_rows),
        "by_category": {c: f"{ok}/{n}" for c, (ok, n) in sorted(by_category.items())},
        "false_positives": false_pos,
        "false_negatives": false_neg,
        "hung": hung,
        "median_ms": round(1000 * statistics.median(seconds), 2),
        "max_s": round(max(seconds), 2),
        "adversarial_max_s": round(
            max((r["seconds"] for row, r in zip(rows, results) if row[3] == "adversarial"), default=0), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--math-verify-python", default="/tmp/mvenv/bin/python", help="an interpreter with math-verify installed"
    )
    parser.add_argument(
        "--strategies", default="dollars,boxed,raw", help="how bare answers are handed to math-verify's parse"
    )
    parser.add_argument(
        "--hang-after", type=float, default=10.0, help="seconds before a math-verify comparison counts as hung"
    )
    parser.add_argument("--show-disagreements", action="store_true")
    parser.add_argument("--math-verify-worker", metavar="STRATEGY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.math_verify_worker:
        _math_verify_worker(args.math_verify_worker)
        return
    sys.path.insert(0, str(ROOT))
    from tests.test_grader_table import TABLE

    rows = list(TABLE) + mathvista_free_form_rows() + [(p, r, e, "other-math") for p, r, e in OTHER_MATH]
    pairs = [(prediction, reference) for prediction, reference, _, _ in rows]
    summaries, all_results = [summarise("vlm_post math_equal", rows, ours := run_ours(pairs))], {"ours": ours}
    for strategy in args.strategies.split(","):
        results = run_math_verify(pairs, args.math_verify_python, strategy, args.hang_after)
        summaries.append(summarise(f"math-verify ({strategy})", rows, results))
        all_results[strategy] = results
    print(json.dumps(summaries, indent=2, ensure_ascii=False))
    if args.show_disagreements:
        for strategy, results in all_results.items():
            if strategy == "ours":
                continue
            print(f"\n# rows where math-verify ({strategy}) is wrong")
            for (prediction, reference, expected, category), result in zip(rows, results):
                if result["equal"] != expected:
                    print(
                        f"  [{category}] {prediction[:50]!r} vs {reference!r}: "
                        f"expected {expected}, got {result['equal']}" + (" (hung)" if result["hung"] else "")
                    )
        print("\n# rows where ours is wrong")
        for (prediction, reference, expected, category), result in zip(rows, all_results["ours"]):
            if result["equal"] != expected:
                print(
                    f"  [{category}] {prediction[:50]!r} vs {reference!r}: expected {expected}, got {result['equal']}"
                )


if __name__ == "__main__":
    main()
