"""The study's figures, each written with its data beside it as CSV (long format: one row per plotted point).

- ``entropy_vs_step``: the RL stage's logged entropy against RL step, one line per arm (the mean over seeds);
- ``accuracy_vs_step``: in-domain and out-of-domain accuracy against RL step, per arm, from the evaluation points
  (entry at step 0, every K steps, end; ``source: eval``) and the RL stage's own validation (``source: val``; a
  validation set that the protocol does not name counts as in-domain);
- ``pass_at_k``: the pass@k curve, k = 1 to n, per arm, at RL entry and at RL end.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from statistics import mean

import torch

from vlm_post.metrics import pass_at_k_per_problem


def _save(figure, out: Path, name: str, header: list[str], rows: list[list]) -> dict[str, Path]:
    """``<name>.png`` and its data, ``<name>.csv``."""
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=120)
    _pyplot().close(figure)
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return {f"{name}.png": out / f"{name}.png", f"{name}.csv": out / f"{name}.csv"}


def _seed_mean(points: list[tuple]) -> list[tuple]:
    """(x, y) points of several seeds -> one (x, mean y) per x."""
    by_x = defaultdict(list)
    for x, y in points:
        by_x[x].append(y)
    return sorted((x, mean(ys)) for x, ys in by_x.items())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_figures(out: Path, plan, evaluations, curves) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    written.update(_entropy(out, plan, curves))
    written.update(_accuracy(out, plan, evaluations, curves))
    written.update(_pass_at_k(out, plan, evaluations))
    return written


def _entropy(out: Path, plan, curves) -> dict[str, Path]:
    rows = [[arm, seed, step, value] for (arm, seed), points in curves.entropy.items() for step, value in points]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm in plan.arms:
        points = _seed_mean([(step, value) for a, _, step, value in rows if a == arm])
        if points:
            axis.plot(*zip(*points), label=arm)
    axis.set(xlabel="RL step", ylabel="policy entropy (token mean, nats)", title="Entropy through RL")
    if axis.lines:
        axis.legend()
    return _save(figure, out, "entropy_vs_step", ["arm", "seed", "step", "entropy"], rows)


def _accuracy(out: Path, plan, evaluations, curves) -> dict[str, Path]:
    protocol = plan.evaluation
    rows = [[e.arm, e.seed, e.dataset, e.domain, e.step, e.summary["accuracy"], "eval"]
            for e in evaluations if e.arm != "base" and e.step is not None]  # fmt: skip
    named = {item.name for item in protocol.datasets}
    for (arm, seed, dataset), points in curves.val_accuracy.items():
        # A validation set the protocol does not name is the RL task's own (in-domain) validation split.
        domain = protocol.domain_of(dataset) if dataset in named else "in"
        # Lightning logs a validation inside fit at the index of the last finished batch: after s + 1 updates.
        rows += [[arm, seed, dataset, domain, step + 1, value, "val"] for step, value in points]
    rows.sort(key=lambda row: (row[0], row[1], row[2], row[6], row[4]))
    plt = _pyplot()
    domains = [domain for domain in ("in", "out") if any(d.domain == domain for d in protocol.datasets)]
    figure, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4), squeeze=False)
    for axis, domain in zip(axes[0], domains):
        for arm_index, arm in enumerate(plan.arms):
            color = f"C{arm_index}"
            for dataset in sorted({r[2] for r in rows if r[3] == domain}):
                for source, style in (("eval", "o-"), ("val", "--")):
                    points = _seed_mean([(r[4], r[5]) for r in rows if (r[0], r[2], r[6]) == (arm, dataset, source)])
                    if points:
                        axis.plot(*zip(*points), style, color=color, label=f"{arm} {dataset} ({source})",
                                  alpha=1.0 if source == "eval" else 0.5)  # fmt: skip
        name = "in-domain" if domain == "in" else "out-of-domain"
        axis.set(xlabel="RL step", ylabel="accuracy", title=f"{name} accuracy through RL")
        if axis.lines:
            axis.legend(fontsize=7)
    return _save(
        figure, out, "accuracy_vs_step", ["arm", "seed", "dataset", "domain", "step", "accuracy", "source"], rows
    )


def _pass_at_k(out: Path, plan, evaluations) -> dict[str, Path]:
    rows = []
    for e in evaluations:
        if e.point not in ("entry", "end"):
            continue
        correct = [record["correct"] for record in e.records if record.get("correct")]
        if not correct:
            continue
        samples = torch.tensor([len(c) for c in correct])
        hits = torch.tensor([sum(c) for c in correct])
        for k in range(1, int(samples.min()) + 1):
            rows.append(
                [e.arm, e.seed, e.point, e.dataset, e.domain, k, float(pass_at_k_per_problem(samples, hits, k).mean())]
            )
    plt = _pyplot()
    primary = next((d.name for d in plan.evaluation.datasets if d.domain == "in"), plan.evaluation.datasets[0].name)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, point in zip(axes, ("entry", "end")):
        for arm_index, arm in enumerate(["base", *plan.arms]):
            if arm == "base" and point == "end":
                continue
            points = _seed_mean([(r[5], r[6]) for r in rows if (r[0], r[2], r[3]) == (arm, point, primary)])
            if points:
                axis.plot(*zip(*points), "o-", label=arm, color="gray" if arm == "base" else f"C{arm_index - 1}")
        axis.set(xlabel="k", ylabel="pass@k", title=f"pass@k on {primary} at RL {point}", xscale="log")
        if axis.lines:
            axis.legend()
    return _save(figure, out, "pass_at_k", ["arm", "seed", "point", "dataset", "domain", "k", "pass_at_k"], rows)
