"""How long grading a batch of 512 rollouts takes: typical, symbolic and adversarial answers.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python tools/bench_grading.py   # one core, as in docs/grading.md

Typical rollouts are built from the real answers in the shared samples (Geometry3K
and MathVista testmini): ~2.5k characters of reasoning, then a boxed answer that is
right in one of the usual surface forms, wrong, unboxed, or a letter. Each batch is
graded with ``MathReward`` (accuracy + format) and the comparison cache cleared
first, so every comparison is computed; "repeated" keeps the cache, as GRPO groups
repeating the same answers would.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlm_post.data.schema import Example  # noqa: E402
from vlm_post.rewards import MathReward, clear_cache, grading_stats, sympy_pool  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
REASONING = "<think>Let the side be s. By the Pythagorean theorem we get s^2 = 3^2 + 4^2, so ... " * 30 + "</think>\n"


def real_examples() -> list[Example]:
    examples = []
    geo = SHARED / "geometry3k-sample" / "sample-00000-of-00001.parquet"
    if geo.is_file():
        import pandas as pd

        for row in pd.read_parquet(geo).itertuples():
            examples.append(Example(str(row.id), [], row.problem, row.answer, "geo3k", choices=list(row.choices)))
    vista = SHARED / "mathvista-testmini" / "testmini.json"
    if vista.is_file():
        for row in json.loads(vista.read_text()).values():
            examples.append(
                Example(row["pid"], [], row["question"], row["answer"], "mathvista", choices=row["choices"],
                        answer_type=row["answer_type"], precision=row["precision"], unit=row["unit"],
                        extra={"question_type": row["question_type"]})
            )  # fmt: skip
    return examples or [Example("1", [], "q", "5\\sqrt{3}", "demo", choices=["5", "5\\sqrt{2}", "5\\sqrt{3}", "10"])]


def typical_answer(example: Example, rng: random.Random) -> str:
    gold = example.answer
    kind = rng.random()
    if kind < 0.15:
        return "I am not sure."  # no box
    if example.choices and kind < 0.35:
        return f"(\\boxed{{{chr(65 + rng.randrange(len(example.choices)))}}})"
    if kind < 0.6:
        return rng.choice(
            [
                f"\\boxed{{{gold}}}",
                f"\\boxed{{x = {gold}}}",
                f"\\boxed{{{gold} \\text{{ cm}}}}",
                f"\\boxed{{\\text{{{gold}}}}}",
            ]
        )
    return "\\boxed{" + rng.choice(WRONG) + "}"


WRONG = ["12", "7.5", "\\frac{3}{4}", "2\\sqrt{5}", "45^\\circ", "yes", "\\frac{16\\pi}{5}"]
SYMBOLIC = ["{a}x + {b}", "({a}x+{b})^2", "\\frac{{{a}}}{{x+{b}}}", "{a}k - {b}", "x^{{{a}}} - {b}y"]
ADVERSARIAL = [
    "9^{{9^{{9^{{{a}}}}}}}", "(" * 3000 + "{a}" + ")" * 3000, "{a}000000!", "x^{{{a}9999999}}",
    "\\sqrt{{" * 300 + "{a}" + "}}" * 300,
    "9" * 4000 + "{a}", "(x+1)^{{{a}000000}}",
]  # fmt: skip


def batch(kind: str, examples: list[Example], rng: random.Random, size: int) -> tuple[list[str], list[Example]]:
    picked = [rng.choice(examples) for _ in range(size)]
    if kind == "typical":
        answers = [typical_answer(e, rng) for e in picked]
    else:
        templates = SYMBOLIC if kind == "symbolic" else ADVERSARIAL
        answers = [
            f"\\boxed{{{rng.choice(templates).format(a=rng.randint(2, 99), b=rng.randint(2, 99))}}}" for _ in picked
        ]
        if kind == "symbolic":  # against an expression reference, so sympy is needed
            picked = [Example(e.id, [], e.question, "3x + 4", "symbolic") for e in picked]
    return [REASONING + a for a in answers], picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    examples, reward = real_examples(), MathReward()
    sympy_pool().warm_up()
    for kind in ("typical", "symbolic", "adversarial"):
        times, rng = [], random.Random(0)
        for _ in range(args.repeats):
            responses, batch_examples = batch(kind, examples, rng, args.size)
            clear_cache()
            grading_stats().reset()
            start = time.perf_counter()
            out = reward(responses, batch_examples)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        reward(responses, batch_examples)  # again, with the cache warm
        repeated = time.perf_counter() - start
        stats = grading_stats().snapshot()
        accuracy = statistics.mean(out.components["accuracy"])
        print(
            f"{kind:12s} {args.size} rollouts: median {1000 * statistics.median(times):7.1f} ms, "
            f"max {1000 * max(times):7.1f} ms, repeated {1000 * repeated:6.1f} ms | accuracy {accuracy:.2f} | "
            f"last batch {stats}"
        )


if __name__ == "__main__":
    main()
