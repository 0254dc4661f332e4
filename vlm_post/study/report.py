"""``vlm_post study report``: the study's table, paired differences and figures, from the finished runs alone.

Reads ``<study_dir>/study.json`` (the plan), each evaluation's ``summary.json`` and per-problem JSONL, and the RL
stages' TensorBoard events; trains nothing. Writes into the study folder:

- ``results.json``: one row per (arm, seed, evaluation point, data set), the keys documented in docs/study.md;
- ``differences.json``: every pair of arms, at every point and data set: the paired difference of each metric
  and its paired problem-level bootstrap interval (the same problems resampled for both arms);
- ``results.md``: the paper's table and the differences;
- ``figures/*.png`` with their data beside them as ``figures/*.csv`` (see ``vlm_post.study.figures``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from statistics import mean, stdev

import torch

from vlm_post.metrics import (
    bootstrap_ci,
    distinct_answer_count,
    majority_at_k_per_problem,
    paired_bootstrap_ci,
    pass_at_k_per_problem,
    seed_problem_bootstrap_ci,
)
from vlm_post.rewards import normalize_answer
from vlm_post.study.curves import Curves, read_curves
from vlm_post.study.plan import Plan, Stage

# mean_token_entropy: the mean over problems of each problem's token-mean entropy (problem-weighted, so that it has a
# problem-level interval); the summary's ``entropy`` is token-weighted over the whole set.
PAIRED_METRICS = (
    "accuracy", "mean_accuracy", "pass@1", "pass@{n}", "maj@{n}", "mean_distinct_answers", "mean_token_entropy"
)  # fmt: skip


@dataclass
class Evaluation:
    """One finished ``vlm_post test`` of one model on one data set: its summary row and per-problem records."""

    arm: str
    seed: int | None
    point: str
    step: int | None
    dataset: str
    domain: str
    summary: dict
    records: list[dict]

    def per_problem(self, metric: str) -> dict:
        """Problem id -> the problem's own value of ``metric``, whose mean over problems is the metric."""
        ids = self.per_problem_ids()
        correct = [record.get("correct") or [] for record in self.records]
        if metric.startswith("pass@"):  # one vectorised call over every problem
            samples, hits = torch.tensor([len(c) for c in correct]), torch.tensor([sum(c) for c in correct])
            return dict(zip(ids, pass_at_k_per_problem(samples, hits, int(metric[5:])).tolist()))
        if metric == "accuracy" and all("greedy_correct" in record for record in self.records):
            return {i: float(record["greedy_correct"]) for i, record in zip(ids, self.records)}
        if metric in ("accuracy", "mean_accuracy"):
            return {i: sum(c) / len(c) for i, c in zip(ids, correct)}
        if metric == "mean_token_entropy":  # a problem whose samples have no token has none
            return {
                i: r["mean_token_entropy"] for i, r in zip(ids, self.records) if r["mean_token_entropy"] is not None
            }
        if not (metric.startswith("maj@") or metric == "mean_distinct_answers"):
            raise KeyError(metric)
        normalized = [[normalize_answer(a) if a is not None else None for a in r["extracted"]] for r in self.records]
        if metric.startswith("maj@"):
            return dict(zip(ids, majority_at_k_per_problem(normalized, correct, int(metric[4:])).tolist()))
        return {i: float(distinct_answer_count(answers)) for i, answers in zip(ids, normalized)}

    def label(self) -> str:
        seed = f" seed {self.seed}" if self.seed is not None else ""
        return f"{self.arm}{seed} {self.point} {self.dataset}"

    def per_problem_ids(self) -> list[str]:
        return [str(record["id"]) for record in self.records]

    def row(self) -> dict:
        metrics = {k: v for k, v in self.summary.items() if k not in ("dataset", "ci")}
        for metric, (low, high) in self.summary.get("ci", {}).items():
            metrics[f"{metric}_ci_low"], metrics[f"{metric}_ci_high"] = low, high
        head = dict(
            arm=self.arm, seed=self.seed, point=self.point, step=self.step, dataset=self.dataset, domain=self.domain
        )
        return {**head, **metrics}


def collect(plan: Plan) -> list[Evaluation]:
    """Every finished evaluation of the plan, one per data set (unfinished ones are left out, and said)."""
    found = []
    for stage in plan.stages:
        if stage.command != "test":
            continue
        if not stage.marker.is_file():
            print(f"study report: {stage.key} has not finished; left out")
            continue
        summary = json.loads((stage.eval_dir / "summary.json").read_text())
        step = stage.step if stage.point != "end" else _final_step(plan.by_key()[stage.needs[0]])
        for row in summary["results"]:
            name = row["dataset"]
            lines = (stage.eval_dir / f"{name}.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
            arm = stage.arm or "base"
            evaluation = Evaluation(
                arm, stage.seed, stage.point, step, name, plan.evaluation.domain_of(name), row, records
            )
            ids = evaluation.per_problem_ids()
            twice = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
            if twice:
                _warn(f"{evaluation.label()}: {len(ids) - len(set(ids))} duplicate problem ids (first {twice[0]!r}); "
                      "each id is compared once, by its last record")  # fmt: skip
            found.append(evaluation)
    return found


def _warn(message: str) -> None:
    print(f"study report: warning: {message}", flush=True)


def _check_alike(label: str, runs: list[Evaluation]) -> None:
    """A warning line for each run that lacks problems another run has (the runs are compared on the shared ones)."""
    sets = [set(run.per_problem_ids()) for run in runs]
    if not sets:
        return
    every, shared = set.union(*sets), set.intersection(*sets)
    for run, ids in zip(runs, sets):
        if len(ids) < len(every):
            _warn(f"{label}: {run.label()} lacks {len(every - ids)} problem(s) that other runs have; compared on the "
                  f"{len(shared)} all of them have")  # fmt: skip


def _final_step(rl: Stage) -> int | None:
    provenance = rl.export_dir / "vlm_post_export.json"
    return json.loads(provenance.read_text()).get("global_step") if provenance.is_file() else None


def paired_differences(evaluations: list[Evaluation], plan: Plan) -> list[dict]:
    """Arm a minus arm b, per point, data set and metric, on the problems both saw, over the seeds both ran.

    The interval resamples seeds, then problems (``_paired``); the sample SD of the per-seed differences is given
    beside it (``seed_sd``). Seeds one arm ran and the other did not, and problems one run has and another lacks,
    are each a warning line (never a silent drop).
    """
    protocol = plan.evaluation
    metrics = [m.format(n=protocol.n) for m in PAIRED_METRICS]
    index = {(e.arm, e.seed, e.point, e.dataset): e for e in evaluations}
    rows = []
    for a, b in combinations(plan.arms, 2):
        for point in ("entry", "end"):
            for dataset in [item.name for item in protocol.datasets]:
                seeds = [s for s in plan.seeds if (a, s, point, dataset) in index and (b, s, point, dataset) in index]
                runs_a = [index[(a, s, point, dataset)] for s in seeds]
                runs_b = [index[(b, s, point, dataset)] for s in seeds]
                label = f"{a} − {b} {point} {dataset}"
                for arm, other in ((a, b), (b, a)):
                    alone = [s for s in plan.seeds if (arm, s, point, dataset) in index and s not in seeds]
                    if alone:
                        _warn(f"{label}: seed(s) {', '.join(map(str, alone))} run by {arm} only (not by {other}); "
                              f"compared on seeds {', '.join(map(str, seeds)) or 'none'}")  # fmt: skip
                _check_alike(label, runs_a + runs_b)
                for metric in metrics:
                    paired = (_paired(metric, runs_a, runs_b, protocol) if seeds else
                              _not_compared(metric, "no seed has both arms' evaluation finished"))  # fmt: skip
                    rows.append({"arm_a": a, "arm_b": b, "point": point, "dataset": dataset,
                                 "domain": protocol.domain_of(dataset), "seeds": seeds, **paired})  # fmt: skip
    return rows


def _paired(metric: str, runs_a: list[Evaluation], runs_b: list[Evaluation], protocol) -> dict:
    """The paired difference of ``metric``, or, where it cannot be compared, a row of Nones with the ``reason``."""
    reason = _why_not_comparable(metric, runs_a + runs_b)
    tables = _tables(metric, runs_a, runs_b) if reason is None else None
    if tables is None:
        return _not_compared(metric, reason or "the arms share no problem")
    (a, b), problems = tables
    settings = (protocol.bootstrap_resamples, protocol.confidence, protocol.bootstrap_seed)
    difference, low, high = seed_problem_bootstrap_ci([a, b], [1.0, -1.0], *settings)
    _, problems_low, problems_high = paired_bootstrap_ci(a.mean(0), b.mean(0), *settings)
    per_seed = (a.mean(1) - b.mean(1)).tolist()  # seeds in the order both arms ran them
    return {"metric": metric, "problems": len(problems), "difference": difference, "ci_low": low, "ci_high": high,
            "ci_problems_low": problems_low, "ci_problems_high": problems_high,
            "seed_sd": stdev(per_seed) if len(per_seed) > 1 else None, "reason": None}  # fmt: skip


def _tables(metric: str, *groups: list[Evaluation]) -> tuple[list[torch.Tensor], list[str]] | None:
    """Each group's (seeds, problems) table of ``metric`` on the problems every run of every group has, and those
    problems; None when there is none."""
    per = [[run.per_problem(metric) for run in runs] for runs in groups]
    problems = sorted(set.intersection(*(set(p) for group in per for p in group)))
    if not problems:
        return None
    return [torch.tensor([[p[i] for i in problems] for p in group], dtype=torch.float64) for group in per], problems


def _not_compared(metric: str, reason: str) -> dict:
    return {"metric": metric, "problems": 0, "difference": None, "ci_low": None, "ci_high": None,
            "ci_problems_low": None, "ci_problems_high": None, "seed_sd": None, "reason": reason}  # fmt: skip


def _why_not_comparable(metric: str, runs: list[Evaluation]) -> str | None:
    """What an evaluation lacks for ``metric`` (too few samples per problem), or None when every run has it."""
    if metric == "mean_token_entropy":
        lacking = next((run for run in runs if any("mean_token_entropy" not in r for r in run.records)), None)
        if lacking is not None:
            return f"{lacking.label()} measured no entropy (eval.entropy: false)"
    greedy = metric == "accuracy" and all("greedy_correct" in r for run in runs for r in run.records)
    needed = 0 if greedy else int(metric.split("@")[1]) if metric.startswith(("pass@", "maj@")) else 1
    for run in runs:
        fewest = min((len(record.get("correct") or []) for record in run.records), default=0)
        if fewest < needed:
            seed = f" seed {run.seed}" if run.seed is not None else ""
            return f"{metric} needs {needed} samples per problem; {run.arm}{seed} has {fewest} on some problem"
    return None


def build_report(study_dir: str | Path) -> dict[str, Path]:
    """Write results.json, differences.json, results.md and the figures; return what was written."""
    from vlm_post.study.figures import write_figures

    plan = Plan.load(study_dir)
    out = Path(study_dir)
    evaluations = collect(plan)
    curves = read_curves(plan)
    rows = [evaluation.row() for evaluation in evaluations]
    for row in rows:
        if row["point"] == "end":
            row["rl_train_entropy_mean"] = curves.mean_entropy(row["arm"], row["seed"])
    rows += pooled_rows(evaluations, plan.evaluation)
    differences = paired_differences(evaluations, plan)
    written = {"results.json": out / "results.json", "differences.json": out / "differences.json"}
    written["results.json"].write_text(json.dumps(rows, indent=2) + "\n")
    written["differences.json"].write_text(json.dumps(differences, indent=2) + "\n")
    written["results.md"] = out / "results.md"
    written["results.md"].write_text(markdown(plan, evaluations, curves, differences))
    written.update(write_figures(out / "figures", plan, evaluations, curves))
    return written


# --- results.md ------------------------------------------------------------------------------------------------


def _cell(runs: list[Evaluation], metric: str, protocol, interval: bool = True) -> str:
    """The metric's mean over seeds, ± its sample SD across seeds, [its interval over seeds and problems]; the mean,
    the SD and the interval on the same problems (those every run has)."""
    if interval and len(runs) > 1:
        pooled = pooled_over_seeds(runs, metric, protocol)
        if pooled is not None:
            return f"{pooled['value']:.3f} ±{pooled['seed_sd']:.3f} [{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}]"
    values = [run.summary[metric] for run in runs if metric in run.summary]
    if not values:
        return "–"
    text = f"{mean(values):.3f}"
    if len(values) > 1:
        text += f" ±{stdev(values):.3f}"
    if interval and len(runs) == 1 and metric in runs[0].summary.get("ci", {}):
        low, high = runs[0].summary["ci"][metric]  # the evaluation's own, over the problems its value is over
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def pooled_rows(evaluations: list[Evaluation], protocol) -> list[dict]:
    """One row per arm, point and data set run with several seeds (``seed: null``, ``seeds``): each paired metric's
    mean over the seeds, its interval over seeds and problems (``_ci_low``/``_ci_high``) and over problems only
    (``_ci_problems_low``/``_ci_problems_high``)."""
    groups: dict[tuple, list[Evaluation]] = {}
    for evaluation in evaluations:
        groups.setdefault((evaluation.arm, evaluation.point, evaluation.dataset), []).append(evaluation)
    rows = []
    for (arm, point, dataset), runs in groups.items():
        if len(runs) < 2:
            continue
        _check_alike(f"{arm} {point} {dataset} over seeds", runs)
        row = {"arm": arm, "seed": None, "seeds": [run.seed for run in runs], "point": point, "step": runs[0].step,
               "dataset": dataset, "domain": runs[0].domain}  # fmt: skip
        for metric in [m.format(n=protocol.n) for m in PAIRED_METRICS]:
            pooled = pooled_over_seeds(runs, metric, protocol)
            if pooled is None:
                row[metric] = None
                continue
            row[metric] = pooled.pop("value")
            row["problems"] = pooled.pop("problems")
            row.update({f"{metric}_{key}": value for key, value in pooled.items()})
        rows.append(row)
    return rows


def pooled_over_seeds(runs: list[Evaluation], metric: str, protocol) -> dict | None:
    """An arm's ``metric`` over its seeds' runs, on the problems every run has: the mean, the two-level (seeds and
    problems) interval and the problems-only one; None where the metric cannot be computed (see ``_paired``)."""
    tables = _tables(metric, runs) if _why_not_comparable(metric, runs) is None else None
    if tables is None:
        return None
    (table,), problems = tables
    settings = (protocol.bootstrap_resamples, protocol.confidence, protocol.bootstrap_seed)
    value, low, high = seed_problem_bootstrap_ci([table], [1.0], *settings)
    problems_low, problems_high = bootstrap_ci(table.mean(0), *settings)
    return {"value": value, "ci_low": low, "ci_high": high, "ci_problems_low": problems_low,
            "ci_problems_high": problems_high, "seed_sd": stdev(table.mean(1).tolist()),
            "problems": len(problems)}  # fmt: skip


def _intro(plan: Plan, first: dict[str, str | None]) -> list[str]:
    protocol = plan.evaluation
    seeds = ", ".join(str(s) for s in plan.seeds)
    level = f"{protocol.confidence:.0%}"
    about = (
        f"Arms: {', '.join(plan.arms)}; seeds: {seeds}. Every model is evaluated on the same problems: greedy "
        f"accuracy, {protocol.n} samples at temperature {protocol.temperature} (pass@k, entropy, answer diversity). "
        f"In-domain: {first['in'] or '–'}; out-of-domain: {first['out'] or '–'}. Cells: the mean over seeds, "
        f"± the sample standard deviation across seeds (several seeds), [the {level} bootstrap interval over seeds "
        f"and problems: each of {protocol.bootstrap_resamples} resamples draws the seeds, then the problems, so "
        "the interval is about the recipe, not only these trained models; with one seed it is over problems only]. "
        "results.json and differences.json also give the problems-only interval (`ci_problems`)."
    )
    points = (
        "`entry` is the warm start's export (RL entry), `end` the RL export. Entropy at entry: the evaluation's, "
        "token-weighted over every sampled token of the set, at the evaluation temperature (the paired differences "
        "use `mean_token_entropy`, each problem's token mean averaged over problems, which has a problem-level "
        "interval). RL train entropy: the mean over RL steps of the RL stage's logged `train/entropy`, a different "
        "estimator: the loss's aggregation (`loss.aggregation`) over the rows the filters kept (dynamic sampling, "
        "overlong filter), averaged over micro-batches and epochs, at the rollout temperature. Compare its course "
        "across arms, not its level with the entry column."
    )
    return [f"# Study {plan.study_dir}", "", about, "", "## The warm starts compared", "", points, ""]


def _arm_row(arm: str, plan: Plan, evaluations: list[Evaluation], curves: Curves, first: dict) -> list[str]:
    """One row of the paper's table: in- and out-of-domain accuracy, entropy, pass@1, pass@n, maj@n, diversity."""
    protocol = plan.evaluation
    ind, ood = first["in"], first["out"]

    def cell(point: str, dataset: str | None, metric: str, interval: bool = True) -> str:
        if dataset is None or (arm == "base" and point == "end"):
            return "–"
        found = [e for e in evaluations if (e.arm, e.point, e.dataset) == (arm, point, dataset)]
        return _cell(found, metric, protocol, interval)

    rl_entropy = [curves.mean_entropy(arm, seed) for seed in plan.seeds] if arm != "base" else []
    rl_entropy = [value for value in rl_entropy if value is not None]
    top, vote = f"pass@{protocol.n}", f"maj@{protocol.n}"
    return [arm, cell("entry", ind, "accuracy"), cell("end", ind, "accuracy"), cell("entry", ood, "accuracy"),
            cell("end", ood, "accuracy"), cell("entry", ind, "entropy", False),
            f"{mean(rl_entropy):.3f}" if rl_entropy else "–", cell("entry", ind, "pass@1"), cell("end", ind, "pass@1"),
            cell("entry", ind, top), cell("end", ind, top), cell("entry", ind, vote), cell("end", ind, vote),
            cell("entry", ind, "mean_distinct_answers", False)]  # fmt: skip


def _seeds(runs: list[Evaluation]) -> str:
    return ", ".join(str(run.seed) for run in runs if run.seed is not None) or "–"


def markdown(plan: Plan, evaluations: list[Evaluation], curves: Curves, differences: list[dict]) -> str:
    protocol = plan.evaluation
    first = {domain: next((d.name for d in protocol.datasets if d.domain == domain), None) for domain in ("in", "out")}
    top = f"pass@{protocol.n}"
    lines = _intro(plan, first)
    header = ["arm", "in-domain acc entry", "in-domain acc end", "out-of-domain acc entry", "out-of-domain acc end",
              "entropy entry", "RL train entropy", "pass@1 entry", "pass@1 end", f"{top} entry", f"{top} end",
              f"maj@{protocol.n} entry", f"maj@{protocol.n} end", "distinct answers entry"]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_arm_row(arm, plan, evaluations, curves, first)) + " |" for arm in ["base", *plan.arms]]
    lines += ["", "## Every data set", "",
              f"| arm | point | data set | domain | accuracy | mean@n | {top} | entropy | problems | seeds |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm in ["base", *plan.arms]:
        for point in ("entry", "end"):
            for dataset in protocol.datasets:
                found = [e for e in evaluations if (e.arm, e.point, e.dataset) == (arm, point, dataset.name)]
                if found:
                    cells = [
                        _cell(found, m, protocol, m != "entropy") for m in ("accuracy", "mean_accuracy", top, "entropy")
                    ]
                    cells += [str(len(set.intersection(*(set(e.per_problem_ids()) for e in found)))), _seeds(found)]
                    lines.append(f"| {arm} | {point} | {dataset.name} | {dataset.domain} | " + " | ".join(cells) + " |")
    paired = (
        f"Arm a minus arm b on the same problems ({protocol.confidence:.0%}, {protocol.bootstrap_resamples} "
        "resamples). The interval is over seeds and problems: a resample draws each arm's seeds on their own, then "
        "the problems once for both arms (paired); `problems only` draws the problems of the seed-averaged values. "
        "`seed sd` is the sample standard deviation of the per-seed differences."
    )
    lines += ["", "## Paired differences between arms", "", paired, "",
              "| a − b | point | data set | metric | difference | interval | problems only | seed sd | problems | seeds |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in differences:
        sd = f"{row['seed_sd']:.3f}" if row["seed_sd"] is not None else "–"
        if row["reason"] is None:
            value, interval = f"{row['difference']:+.3f}", f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
            problems_only = f"[{row['ci_problems_low']:+.3f}, {row['ci_problems_high']:+.3f}]"
        else:
            value, interval, problems_only = "–", f"not compared: {row['reason']}", "–"
        lines.append(f"| {row['arm_a']} − {row['arm_b']} | {row['point']} | {row['dataset']} | {row['metric']} | "
                     f"{value} | {interval} | {problems_only} | {sd} | {row['problems']} | "
                     f"{', '.join(map(str, row['seeds'])) or '–'} |")  # fmt: skip
    figures = "`figures/entropy_vs_step.png`, `figures/accuracy_vs_step.png`, `figures/pass_at_k.png`"
    lines += ["", f"Figures (each with its data as CSV beside it): {figures}.", ""]
    return "\n".join(lines)
