"""The RL curves, from what the RL stages already log: TensorBoard scalars under ``lightning_logs/version_*``.

A resumed stage writes a new version that starts at the resumed step; reading the versions in order and letting a
later one replace the steps it repeats gives the curve of one uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from vlm_post.study.plan import Plan

ENTROPY_TAG = "train/entropy"  # RLModule's token entropy of its own rollouts, at the rollout temperature
# what else RLModule logs of that entropy (losses/entropy.py: entropy_stats), for the entropy_detail figure
ENTROPY_DETAIL_TAGS = ("train/entropy_top20_mean", "train/entropy_above_threshold")


@dataclass
class Curves:
    """Per (arm, seed): the RL stage's entropy by step (and its top-20% mean and share above a threshold, where
    logged); per (arm, seed, data set): its validation accuracy by step."""

    entropy: dict[tuple[str, int], list[tuple[int, float]]] = field(default_factory=dict)
    # per (arm, seed, measure): the other entropy statistics, measure the tag without "train/"
    entropy_detail: dict[tuple[str, int, str], list[tuple[int, float]]] = field(default_factory=dict)
    val_accuracy: dict[tuple[str, int, str], list[tuple[int, float]]] = field(default_factory=dict)

    def mean_entropy(self, arm: str, seed: int | None) -> float | None:
        points = self.entropy.get((arm, seed))
        return mean(value for _, value in points) if points else None


def scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged, tag -> [(step, value)] by step, over all its logger versions."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(Path(run_dir).glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[-1]))
    merged: dict[str, dict[int, float]] = {}
    for version in versions:
        accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            events = accumulator.Scalars(tag)
            if not events:
                continue
            by_step = merged.setdefault(tag, {})
            first = min(event.step for event in events)
            for step in [s for s in by_step if s >= first]:
                del by_step[step]  # a resumed run repeats these steps: its values are the run's
            by_step.update({event.step: float(event.value) for event in events})
    return {tag: sorted(by_step.items()) for tag, by_step in merged.items()}


def read_curves(plan: Plan) -> Curves:
    curves = Curves()
    for stage in plan.stages:
        if not stage.curves or not stage.run_path.is_dir():
            continue
        logged = scalars(stage.run_path)
        if logged.get(ENTROPY_TAG):
            curves.entropy[(stage.arm, stage.seed)] = logged[ENTROPY_TAG]
        for tag in ENTROPY_DETAIL_TAGS:
            if logged.get(tag):
                curves.entropy_detail[(stage.arm, stage.seed, tag[len("train/") :])] = logged[tag]
        for tag, points in logged.items():  # every validation set the RL stage has, the protocol's or its own
            if tag.startswith("val/") and tag.endswith("/accuracy") and points:
                curves.val_accuracy[(stage.arm, stage.seed, tag[len("val/") : -len("/accuracy")])] = points
    return curves
