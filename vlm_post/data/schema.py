"""The one example schema every data source is normalised to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One problem, whatever its source.

    ``answer_type`` follows MathVista's vocabulary (``text``, ``integer``, ``float``,
    ``list``) plus ``expression`` for Geometry3K's LaTeX answers. ``extra`` keeps the
    source's other columns (e.g. a teacher solution used as an SFT target, or
    MathVista's ``question_type``) so nothing is lost in normalisation.
    """

    id: str
    images: list[Any]  # PIL images, already converted to RGB and resized
    question: str
    answer: str
    source: str
    choices: list[str] | None = None
    answer_type: str = "expression"
    precision: int | None = None
    unit: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # A copy that only fills a rank's last evaluation batch (data.sampler.EvalShardSampler): sampled and graded
    # like the others, so every rank runs the same forwards, but left out of every metric and record.
    is_padding: bool = False
