"""Answer extraction and the grading used by evaluation (the full grader table comes with the grading issue)."""

from __future__ import annotations

from PIL import Image

from vlm_post.data.schema import Example
from vlm_post.rewards import extract_boxed, grade, math_equal


def test_extract_boxed():
    assert extract_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} then \\boxed {2}") == "2"
    assert extract_boxed("\\fbox{x}") == "x"
    assert extract_boxed("\\boxed{\\boxed{7}}") == "7"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{unclosed") is None


def test_math_equal_basic_forms():
    assert math_equal("0.5", "\\frac{1}{2}")
    assert math_equal("x = 13", "13")
    assert math_equal("30^\\circ", "30")
    assert math_equal("\\boxed{12}", "12")
    assert math_equal("\\text{red}", "red")
    assert not math_equal("blue", "red")
    assert not math_equal("", "red")
    assert not math_equal(None, "1")


def test_grade_maps_choice_letters():
    example = Example(id="1", images=[Image.new("RGB", (2, 2))], question="q", answer="5\\sqrt{3}", source="s", choices=["5", "10", "5\\sqrt{3}"])
    assert grade("<think></think>\\boxed{C}", example) == (True, "C")
    assert grade("\\boxed{B}", example) == (False, "B")
    assert grade("no answer", example) == (False, None)
