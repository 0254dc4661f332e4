"""The study's figures, each written with its data beside it as CSV (long format: one row per plotted point).

Each shows its uncertainty, and its CSV carries the bounds:

- ``entropy_vs_step``: the RL stage's logged entropy against RL step, one line per arm (the mean over seeds), in a
  band of ± the sample SD across seeds where there are several (``seed_sd`` on each row);
- ``entropy_detail_vs_step`` (where the RL stages logged them): the mean entropy of the highest-entropy 20% of
  tokens and the share of tokens above the entropy threshold, one panel each, drawn like ``entropy_vs_step``;
- ``accuracy_vs_step``: in-domain and out-of-domain accuracy against RL step, per arm, from the evaluation points
  (entry at step 0, every K steps, end; ``source: eval``) and the RL stage's own validation (``source: val``; a
  validation set that the protocol does not name counts as in-domain). Each evaluation point has its interval
  (``ci_low``, ``ci_high``): over problems for one seed, and, on the ``seed: all`` rows that pool several seeds,
  over seeds and problems (``vlm_post.study.report.pooled_over_seeds``), drawn as error bars;
- ``pass_at_k``: the pass@k curve, k = 1 to n, per arm, at RL entry and at RL end, each point with its interval
  (error bars; pooled the same way).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

import torch

from vlm_post.metrics import bootstrap_ci, pass_at_k_per_problem, seed_problem_bootstrap_ci


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
    if curves.entropy_detail:
        written.update(_entropy_detail(out, plan, curves))
    written.update(_accuracy(out, plan, evaluations, curves))
    written.update(_pass_at_k(out, plan, evaluations))
    return written


def _with_seed_sd(rows: list[list]) -> list[list]:
    """[arm, seed, step, value] rows, each with the SD across seeds of its (arm, step) appended (None: one seed)."""
    by_step = defaultdict(list)
    for arm, _, step, value in rows:
        by_step[(arm, step)].append(value)
    spread = {key: stdev(values) if len(values) > 1 else None for key, values in by_step.items()}
    return [[*row, spread[(row[0], row[2])]] for row in rows]


def _plot_arms(axis, plan, rows: list[list]) -> None:
    """One line per arm, the mean over seeds, in a band of ± the SD across seeds where there are several."""
    spread = {(arm, step): sd for arm, _, step, _, sd in rows}
    for index, arm in enumerate(plan.arms):
        points = _seed_mean([(step, value) for a, _, step, value, _ in rows if a == arm])
        if points:
            steps, means = zip(*points)
            axis.plot(steps, means, label=arm, color=f"C{index}")
            sds = [spread[(arm, step)] for step in steps]
            if all(sd is not None for sd in sds):  # several seeds: their spread
                low, high = [m - sd for m, sd in zip(means, sds)], [m + sd for m, sd in zip(means, sds)]
                axis.fill_between(steps, low, high, color=f"C{index}", alpha=0.2, linewidth=0)
    if axis.lines:
        axis.legend()


def _entropy(out: Path, plan, curves) -> dict[str, Path]:
    rows = [[arm, seed, step, value] for (arm, seed), points in curves.entropy.items() for step, value in points]
    rows = _with_seed_sd(rows)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    _plot_arms(axis, plan, rows)
    axis.set(xlabel="RL step", ylabel="RL train entropy (nats)", title="Entropy through RL (± SD across seeds)")
    return _save(figure, out, "entropy_vs_step", ["arm", "seed", "step", "entropy", "seed_sd"], rows)


ENTROPY_DETAIL_LABELS = {
    "entropy_top20_mean": "entropy of the top-20% tokens (nats)",
    "entropy_above_threshold": "share of tokens above the threshold",
}


def _entropy_detail(out: Path, plan, curves) -> dict[str, Path]:
    measures = [m for m in ENTROPY_DETAIL_LABELS if any(key[2] == m for key in curves.entropy_detail)]
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(measures), figsize=(6 * len(measures), 4), squeeze=False)
    written_rows = []
    for axis, measure in zip(axes[0], measures):
        rows = [
            [arm, seed, step, value]
            for (arm, seed, m), points in curves.entropy_detail.items()
            if m == measure
            for step, value in points
        ]
        rows = _with_seed_sd(rows)
        _plot_arms(axis, plan, rows)
        axis.set(xlabel="RL step", ylabel=ENTROPY_DETAIL_LABELS[measure], title=f"{measure} (± SD across seeds)")
        written_rows += [[arm, seed, step, measure, value, sd] for arm, seed, step, value, sd in rows]
    header = ["arm", "seed", "step", "measure", "value", "seed_sd"]
    return _save(figure, out, "entropy_detail_vs_step", header, written_rows)


def _pooled_interval(runs, metric: str, protocol) -> tuple[float | None, float | None]:
    """The interval of ``metric`` over several seeds' runs (seeds and problems), or of one run (over problems)."""
    from vlm_post.study.report import pooled_over_seeds

    if len(runs) > 1:
        pooled = pooled_over_seeds(runs, metric, protocol)
        return (pooled["ci_low"], pooled["ci_high"]) if pooled else (None, None)
    low_high = runs[0].summary.get("ci", {}).get(metric)
    return tuple(low_high) if low_high else (None, None)


def _accuracy(out: Path, plan, evaluations, curves) -> dict[str, Path]:
    protocol = plan.evaluation
    evaluated = [e for e in evaluations if e.arm != "base" and e.step is not None]
    rows = [[e.arm, e.seed, e.dataset, e.domain, e.step, e.summary["accuracy"], "eval", *_pooled_interval([e], "accuracy", protocol)]
            for e in evaluated]  # fmt: skip
    groups = defaultdict(list)
    for e in evaluated:
        groups[(e.arm, e.dataset, e.domain, e.step)].append(e)
    for (arm, dataset, domain, step), runs in groups.items():
        if len(runs) > 1:  # the seeds pooled: their mean and the interval over seeds and problems
            value = mean(run.summary["accuracy"] for run in runs)
            rows.append(
                [arm, "all", dataset, domain, step, value, "eval", *_pooled_interval(runs, "accuracy", protocol)]
            )
    named = {item.name for item in protocol.datasets}
    for (arm, seed, dataset), points in curves.val_accuracy.items():
        # A validation set the protocol does not name is the RL task's own (in-domain) validation split.
        domain = protocol.domain_of(dataset) if dataset in named else "in"
        # Lightning logs a validation inside fit at the index of the last finished batch: after s + 1 updates.
        rows += [[arm, seed, dataset, domain, step + 1, value, "val", None, None] for step, value in points]
    rows.sort(key=lambda row: (row[0], str(row[1]), row[2], row[6], row[4]))
    plt = _pyplot()
    domains = [domain for domain in ("in", "out") if any(d.domain == domain for d in protocol.datasets)]
    figure, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4), squeeze=False)
    for axis, domain in zip(axes[0], domains):
        for arm_index, arm in enumerate(plan.arms):
            color = f"C{arm_index}"
            for dataset in sorted({r[2] for r in rows if r[3] == domain}):
                for source, style in (("eval", "o-"), ("val", "--")):
                    mine = [r for r in rows if (r[0], r[2], r[6]) == (arm, dataset, source) and r[1] != "all"]
                    points = _seed_mean([(r[4], r[5]) for r in mine])
                    if not points:
                        continue
                    label = f"{arm} {dataset} ({source})"
                    bounds = _bounds(rows, arm, dataset, [x for x, _ in points]) if source == "eval" else None
                    if bounds:  # each evaluation point's interval, as error bars
                        errors = [[y - low for (_, y), (low, _) in zip(points, bounds)],
                                  [high - y for (_, y), (_, high) in zip(points, bounds)]]  # fmt: skip
                        axis.errorbar(*zip(*points), yerr=errors, fmt=style, capsize=2, color=color, label=label)
                    else:
                        axis.plot(
                            *zip(*points), style, color=color, label=label, alpha=1.0 if source == "eval" else 0.5
                        )
        name = "in-domain" if domain == "in" else "out-of-domain"
        axis.set(xlabel="RL step", ylabel="accuracy", title=f"{name} accuracy through RL")
        if axis.lines:
            axis.legend(fontsize=7)
    header = ["arm", "seed", "dataset", "domain", "step", "accuracy", "source", "ci_low", "ci_high"]
    return _save(figure, out, "accuracy_vs_step", header, rows)


def _bounds(rows: list[list], arm: str, dataset: str, steps: list) -> list[tuple] | None:
    """(low, high) of each of an arm's evaluation points: the pooled row's interval, else the one seed's."""
    bounds = []
    for step in steps:
        at = [r for r in rows if (r[0], r[2], r[4], r[6]) == (arm, dataset, step, "eval")]
        pooled = [r for r in at if r[1] == "all"] or (at if len(at) == 1 else [])
        if not pooled or pooled[0][7] is None:
            return None
        bounds.append((pooled[0][7], pooled[0][8]))
    return bounds


def _pass_at_k(out: Path, plan, evaluations) -> dict[str, Path]:
    protocol = plan.evaluation
    settings = (protocol.bootstrap_resamples, protocol.confidence, protocol.bootstrap_seed)
    groups = defaultdict(list)
    for e in evaluations:
        if e.point in ("entry", "end") and any(record.get("correct") for record in e.records):
            groups[(e.arm, e.point, e.dataset, e.domain)].append(e)
    rows = []
    for (arm, point, dataset, domain), runs in groups.items():
        tables = {}  # k -> (seeds, problems) per-problem pass@k, on the problems every run has with samples
        shared = set.intersection(*({str(r["id"]) for r in e.records if r.get("correct")} for e in runs))
        per_run = [{str(r["id"]): r["correct"] for r in e.records if str(r["id"]) in shared} for e in runs]
        ids = sorted(shared)
        samples = torch.tensor([[len(run[i]) for i in ids] for run in per_run])
        hits = torch.tensor([[sum(run[i]) for i in ids] for run in per_run])
        for k in range(1, int(samples.min()) + 1):
            tables[k] = torch.stack([pass_at_k_per_problem(s, h, k) for s, h in zip(samples, hits)])
        for k, table in tables.items():
            for run, values in zip(runs, table):  # each seed, with its problems-only interval
                low, high = bootstrap_ci(values, *settings)
                rows.append([arm, run.seed, point, dataset, domain, k, float(values.mean()), low, high])
            if len(runs) > 1:  # the seeds pooled: over seeds and problems
                value, low, high = seed_problem_bootstrap_ci([table], [1.0], *settings)
                rows.append([arm, "all", point, dataset, domain, k, value, low, high])
    plt = _pyplot()
    primary = next((d.name for d in plan.evaluation.datasets if d.domain == "in"), plan.evaluation.datasets[0].name)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, point in zip(axes, ("entry", "end")):
        for arm_index, arm in enumerate(["base", *plan.arms]):
            if arm == "base" and point == "end":
                continue
            mine = [r for r in rows if (r[0], r[2], r[3]) == (arm, point, primary)]
            pooled = [r for r in mine if r[1] == "all"] or mine  # several seeds: the pooled rows; else the one seed's
            if pooled:
                ks, values = [r[5] for r in pooled], [r[6] for r in pooled]
                errors = [[v - r[7] for v, r in zip(values, pooled)], [r[8] - v for v, r in zip(values, pooled)]]
                axis.errorbar(ks, values, yerr=errors, fmt="o-", capsize=2, label=arm,
                              color="gray" if arm == "base" else f"C{arm_index - 1}")  # fmt: skip
        axis.set(xlabel="k", ylabel="pass@k", title=f"pass@k on {primary} at RL {point}", xscale="log")
        if axis.lines:
            axis.legend()
    header = ["arm", "seed", "point", "dataset", "domain", "k", "pass_at_k", "ci_low", "ci_high"]
    return _save(figure, out, "pass_at_k", header, rows)
