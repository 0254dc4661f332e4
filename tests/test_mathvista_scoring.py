"""MathVista scoring semantics (``mathvista_correct``) on all 1000 testmini rows, and the tricky rows by name."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import MATHVISTA_TESTMINI, needs_shared
from vlm_post.data.sources import mathvista_example
from vlm_post.rewards import grade, mathvista_correct, normalize_answer, strip_units

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def testmini() -> dict[str, dict]:
    return json.loads(MATHVISTA_TESTMINI.read_text())


def _right_and_wrong_forms(row: dict) -> tuple[list[str], list[str]]:
    """Surface forms of the gold answer that must score correct, and answers that must score wrong."""
    gold = row["answer"]
    if row["question_type"] == "multi_choice":
        choices = row["choices"]
        letter = chr(65 + choices.index(gold))
        right = [
            f"\\boxed{{{letter}}}", f"\\boxed{{({letter})}}", f"\\boxed{{{gold}}}", f"\\boxed{{({letter}) {gold}}}",
            f"The answer is \\boxed{{{letter}. {gold}}}", f"<think>...</think> \\boxed{{\\text{{{gold}}}}}",
            letter, f"({letter})", f"Answer: {letter}",
        ]  # fmt: skip
        if not any(normalize_answer(c) == letter.lower() for c in choices):  # "(e)" can be a choice's text
            right.append(f"\\boxed{{{letter.lower()}}}")
        if strip_units(gold) != gold:
            right.append(f"\\boxed{{{strip_units(gold)}}}")  # "20" for "20cm"
        other = next(i for i, c in enumerate(choices) if normalize_answer(c) != normalize_answer(gold))
        wrong = [
            f"\\boxed{{{chr(65 + other)}}}",
            f"\\boxed{{{choices[other]}}}",
            f"\\boxed{{({chr(65 + other)}) {gold}}}",
        ]
        return right, wrong
    unit = row["unit"] or ""
    if row["answer_type"] == "integer":
        right = [
            f"\\boxed{{{gold}}}",
            f"\\boxed{{x = {gold}}}",
            f"\\boxed{{{gold} {unit}}}",
            f"\\boxed{{{gold}.0}}",
            gold,
            f"\\boxed{{${gold}$}}",
        ]
        return right, [f"\\boxed{{{int(gold) + 1}}}", f"\\boxed{{{gold}.5}}"]
    if row["answer_type"] == "float":
        precision, value = row["precision"], float(gold)
        more_digits = f"{value + 0.4 * 10**-precision:.{precision + 1}f}"  # rounds to the gold answer
        right = [
            f"\\boxed{{{gold}}}",
            f"\\boxed{{x = {gold}}}",
            f"\\boxed{{{more_digits}}}",
            gold,
            f"\\boxed{{{gold} {unit or 'cm'}}}",
        ]
        return right, [f"\\boxed{{{value + 10**-precision:.{precision}f}}}"]
    items = json.loads(gold)
    right = [
        f"\\boxed{{{gold}}}",
        f"\\boxed{{{', '.join(map(str, items))}}}",
        f"\\boxed{{{gold.replace(' ', '')}}}",
        gold,
    ]
    return right, [f"\\boxed{{{json.dumps(items[:-1] + [items[-1] + 1])}}}", f"\\boxed{{{json.dumps(items[:-1])}}}"]


@needs_shared
def test_every_testmini_row_in_every_surface_form(testmini):
    assert len(testmini) == 1000
    wrongly_scored = []
    for pid, row in testmini.items():
        right, wrong = _right_and_wrong_forms(row)
        wrongly_scored += [(pid, form, "should be correct") for form in right if not mathvista_correct(form, row)]
        wrongly_scored += [(pid, form, "should be wrong") for form in wrong if mathvista_correct(form, row)]
    assert wrongly_scored == []


@needs_shared
def test_rows_whose_choices_are_letters(testmini):
    ordered = testmini["10"]  # choices ['A', 'B', 'C', 'D', 'E'], answer 'E'
    assert mathvista_correct("\\boxed{E}", ordered) and not mathvista_correct("\\boxed{D}", ordered)
    lower = testmini["342"]  # choices ['a', 'b', 'c', 'd', 'e'], answer 'd'
    assert mathvista_correct("\\boxed{D}", lower) and mathvista_correct("\\boxed{d}", lower)
    shuffled = testmini["168"]  # choices ['(c)', '(a)', '(e)', '(d)', '(b)'], answer '(b)'
    assert shuffled["choices"] == ["(c)", "(a)", "(e)", "(d)", "(b)"] and shuffled["answer"] == "(b)"
    assert mathvista_correct("\\boxed{E}", shuffled)  # option E is the text "(b)"
    assert mathvista_correct("\\boxed{(b)}", shuffled)  # the text itself
    assert mathvista_correct("\\boxed{(E) (b)}", shuffled)
    assert not mathvista_correct("\\boxed{B}", shuffled)  # option B is "(a)"
    assert not mathvista_correct("\\boxed{(B) (b)}", shuffled)  # letter and text disagree: wrong, not a guess


@needs_shared
def test_duplicate_choices_and_units(testmini):
    duplicated = testmini["781"]  # ['9', '12', '18', '18']: either copy of the answer is the answer
    assert duplicated["choices"] == ["9", "12", "18", "18"]
    gold_letters = [chr(65 + i) for i, c in enumerate(duplicated["choices"]) if c == duplicated["answer"]]
    assert all(mathvista_correct(f"\\boxed{{{letter}}}", duplicated) for letter in gold_letters)
    sea_miles = testmini["587"]  # ['20海里', '20√{2}海里', '15海里', '20海里'], answer '20√{2}海里'
    assert mathvista_correct("\\boxed{20\\sqrt{2}}", sea_miles)
    assert not mathvista_correct("\\boxed{20}", sea_miles)
    years = next(r for r in testmini.values() if r["unit"] == "years" and r["answer_type"] == "integer")
    assert mathvista_correct(f"\\boxed{{{years['answer']} years}}", years)


def test_integer_float_and_list_semantics():
    integer = {
        "question_type": "free_form",
        "answer_type": "integer",
        "answer": "2",
        "choices": None,
        "precision": None,
        "unit": None,
    }
    assert mathvista_correct("\\boxed{2}", integer) and mathvista_correct("\\boxed{\\frac{4}{2}}", integer)
    assert not mathvista_correct("\\boxed{2.7}", integer)  # the official int(float(x)) would truncate this to 2
    assert not mathvista_correct("\\boxed{3}", integer)
    floating = {
        "question_type": "free_form",
        "answer_type": "float",
        "answer": "1.2",
        "choices": None,
        "precision": 1,
        "unit": None,
    }
    assert mathvista_correct("\\boxed{1.23}", floating)  # rounded to the row's precision
    assert mathvista_correct("\\boxed{\\frac{6}{5}}", floating)
    assert not mathvista_correct("\\boxed{1.3}", floating)
    two_places = dict(floating, answer="0.21", precision=2)
    assert mathvista_correct("\\boxed{0.214}", two_places) and not mathvista_correct("\\boxed{0.2}", two_places)
    listed = {
        "question_type": "free_form",
        "answer_type": "list",
        "answer": "[2014, 2016]",
        "choices": None,
        "precision": None,
        "unit": None,
    }
    assert mathvista_correct("\\boxed{[2014, 2016]}", listed) and mathvista_correct("\\boxed{2014, 2016}", listed)
    assert not mathvista_correct("\\boxed{[2016, 2014]}", listed)


def test_extraction_without_a_box_and_garbage():
    row = {
        "question_type": "multi_choice",
        "answer_type": "text",
        "answer": "No",
        "choices": ["Yes", "No"],
        "precision": None,
        "unit": None,
    }
    assert (
        mathvista_correct("No", row)
        and mathvista_correct("(B)", row)
        and mathvista_correct("... so the answer is B.", row)
    )
    assert not mathvista_correct("Yes", row)
    long_free_text = (
        "I think it is no. " * 10
    )  # no box and not short: no answer (the official GPT extraction would find one)
    assert not mathvista_correct(long_free_text, row)
    for garbage in [None, "", "\\boxed{", "\\boxed{Maybe}", 12, "\\boxed{" * 500]:
        assert mathvista_correct(garbage, row) is False
    assert (
        mathvista_correct("\\boxed{No}", {"question_type": "multi_choice"}) is False
    )  # malformed row: wrong, no raise


@needs_shared
def test_grade_dispatches_mathvista_examples_to_mathvista_semantics(testmini, tmp_path):
    image_path = tmp_path / "images" / "1.jpg"
    image_path.parent.mkdir()
    Image.new("RGB", (4, 4)).save(image_path)
    float_row = dict(testmini["1"], image="images/1.jpg")  # answer '1.2', precision 1
    example = mathvista_example(float_row, 0, "mathvista", base_dir=tmp_path)
    assert example.extra["question_type"] == "free_form" and example.precision == 1
    assert grade("<think>k</think> \\boxed{1.23}", example) == (True, "1.23")  # precision rounding, not math_equal
    assert grade("\\boxed{1.3}", example) == (False, "1.3")
    assert grade("1.2", example) == (False, None)  # grade needs a box
    choice_row = dict(testmini["168"], image="images/1.jpg")
    example = mathvista_example(choice_row, 0, "mathvista", base_dir=tmp_path)
    assert grade("\\boxed{E}", example) == (True, "E") and grade("\\boxed{B}", example)[0] is False
