"""``vlm_post study`` end to end on a tiny two-arm study, as a user runs it: plan, run, kill, rerun, report."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.study_fixtures import tiny_study
from vlm_post.errors import ConfigError
from vlm_post.metrics import paired_bootstrap_ci, seed_problem_bootstrap_ci
from vlm_post.study.plan import MARKER, Plan

VLM_POST = str(Path(sys.executable).parent / "vlm_post")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def study(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VLM_POST, "study", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def finished(tiny_model, demo_data, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The tiny study, run once without interruption: (its config, its folder, the run)."""
    root = tmp_path_factory.mktemp("study")
    config = tiny_study(tiny_model, demo_data, root / "configs", root / "study", kind="local", max_parallel=2)
    result = study("--config", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return config, root / "study", result


def _csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_study_runs_every_stage_and_reports(finished):
    _, folder, result = finished
    plan = json.loads((folder / "study.json").read_text())
    keys = [stage["key"] for stage in plan["stages"]]
    assert len(keys) == 11 and all((folder / key / "vlm_post_stage.json").is_file() for key in keys)
    assert "[11/11 done] finished" in result.stdout and "running short/seed0/rl" in result.stdout
    # Handoff: each stage starts from the export of the one before; every run folder holds its resolved config.
    rl_config = yaml.safe_load((folder / "long/seed0/rl/lightning_logs/version_0/config.yaml").read_text())
    assert rl_config["model"]["init_args"]["init_from"] == str(folder / "long/seed0/sft/export")
    assert all(list((folder / key).glob("lightning_logs/version_0/config.yaml")) for key in keys)

    rows = json.loads((folder / "results.json").read_text())
    points = {(r["arm"], r["point"], r["dataset"]) for r in rows}
    assert len(rows) == len(points) == 2 + 2 * 3 * 2  # base, and each arm at entry, step_2 and end, on 2 data sets
    assert {r["point"] for r in rows} == {"entry", "step_2", "end"}
    assert {(r["dataset"], r["domain"]) for r in rows} == {("demo_test", "in"), ("demo_shifted", "out")}
    for row in rows:
        assert {
            "accuracy",
            "pass@4",
            "maj@4",
            "entropy",
            "mean_distinct_answers",
            "maj@4_ci_low",
            "pass@4_ci_high",
        } <= set(row)
        assert row["accuracy_ci_low"] <= row["accuracy"] <= row["accuracy_ci_high"]
    end = [r for r in rows if r["point"] == "end"]
    assert all(r["step"] == 4 and r["rl_train_entropy_mean"] > 0 for r in end)
    # The arms really differ here (the long SFT is another model), so the comparison is not trivially zero.
    entry = {r["arm"]: r for r in rows if r["point"] == "entry" and r["dataset"] == "demo_test"}
    assert entry["short"]["entropy"] != entry["long"]["entropy"]

    differences = json.loads((folder / "differences.json").read_text())
    accuracy = [d for d in differences if (d["point"], d["dataset"], d["metric"]) == ("entry", "demo_test", "accuracy")]
    assert len(accuracy) == 1 and accuracy[0]["arm_a"] == "short" and accuracy[0]["arm_b"] == "long"
    assert accuracy[0]["difference"] == pytest.approx(entry["short"]["accuracy"] - entry["long"]["accuracy"])
    markdown = (folder / "results.md").read_text()
    assert "| short |" in markdown and "| long |" in markdown and "## Paired differences between arms" in markdown

    # Figures, each with its CSV: one line per arm, the expected number of points.
    figures = folder / "figures"
    assert all(
        (figures / f"{name}.png").stat().st_size > 1000 for name in ("entropy_vs_step", "accuracy_vs_step", "pass_at_k")
    )
    entropy = _csv(figures / "entropy_vs_step.csv")
    assert {r["arm"] for r in entropy} == {"short", "long"}
    assert all(sorted(int(r["step"]) for r in entropy if r["arm"] == arm) == [0, 1, 2, 3] for arm in ("short", "long"))
    detail = _csv(figures / "entropy_detail_vs_step.csv")  # RLModule's entropy_top20_mean, entropy_above_threshold
    assert (figures / "entropy_detail_vs_step.png").stat().st_size > 1000
    for measure in ("entropy_top20_mean", "entropy_above_threshold"):
        for arm in ("short", "long"):
            assert sorted(int(r["step"]) for r in detail if (r["arm"], r["measure"]) == (arm, measure)) == [0, 1, 2, 3]
    top20 = {(r["arm"], r["step"]): float(r["value"]) for r in detail if r["measure"] == "entropy_top20_mean"}
    assert all(top20[(r["arm"], r["step"])] >= float(r["entropy"]) for r in entropy)  # the top fifth: at least the mean
    accuracy_curve = [r for r in _csv(figures / "accuracy_vs_step.csv") if r["source"] == "eval"]
    for arm in ("short", "long"):
        for dataset in ("demo_test", "demo_shifted"):
            steps = sorted(int(r["step"]) for r in accuracy_curve if (r["arm"], r["dataset"]) == (arm, dataset))
            assert steps == [0, 2, 4], (arm, dataset, steps)
    pass_at_k = _csv(figures / "pass_at_k.csv")
    assert {r["arm"] for r in pass_at_k} == {"base", "short", "long"}
    curve = [r for r in pass_at_k if (r["arm"], r["point"], r["dataset"]) == ("short", "end", "demo_test")]
    assert [int(r["k"]) for r in curve] == [1, 2, 3, 4]
    assert float(curve[-1]["pass_at_k"]) == pytest.approx(
        next(r["pass@4"] for r in end if r["arm"] == "short" and r["dataset"] == "demo_test")
    )


@pytest.mark.slow
def test_rerun_of_a_finished_study_runs_nothing(finished):
    config, folder, _ = finished
    markers = {p: p.stat().st_mtime_ns for p in folder.rglob("vlm_post_stage.json")}
    result = study("--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "11 of 11 stages already finished, skipped" in result.stdout and "running" not in result.stdout
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("vlm_post_stage.json")} == markers
    before = {name: (folder / name).read_text() for name in ("results.json", "differences.json", "results.md")}
    (folder / "results.json").unlink()
    report = study("report", "--dir", str(folder))  # the report alone, rebuilt from the runs: the same numbers
    assert report.returncode == 0 and "results.md" in report.stdout, report.stderr[-2000:]
    assert {name: (folder / name).read_text() for name in before} == before


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_finishes_with_the_same_results(finished, tiny_model, demo_data, tmp_path):
    reference = json.loads((finished[1] / "results.json").read_text())  # 2 stages at a time there, 1 here
    config = tiny_study(tiny_model, demo_data, tmp_path / "configs", tmp_path / "study")
    folder = tmp_path / "study"
    process = subprocess.Popen([VLM_POST, "study", "--config", str(config)], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    last = folder / "long/seed0/sft/checkpoints/last.ckpt"  # written at step 8 of 24: the long SFT is mid-run
    deadline = time.time() + 600
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert last.exists(), process.communicate()[0][-3000:]
    process.send_signal(signal.SIGKILL)  # the study process alone: its running stage must die with it
    process.communicate()
    assert not (folder / "long/seed0/sft/vlm_post_stage.json").exists()
    time.sleep(1.0)
    orphans = subprocess.run(
        ["pgrep", "-f", str(folder / "long/seed0/sft")], capture_output=True, text=True
    ).stdout.split()
    assert not orphans, f"the killed study left its stage running: {orphans}"

    done_before = {p: p.stat().st_mtime_ns for p in folder.rglob("vlm_post_stage.json")}
    assert len(done_before) == 6  # base/eval and the whole short arm (5 stages)
    result = study("--config", str(config))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "6 of 11 stages already finished, skipped" in result.stdout
    assert f"running long/seed0/sft (resuming {last})" in result.stdout
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in done_before.items()), "a finished stage ran again"
    resumed = json.loads((folder / "results.json").read_text())
    assert len(resumed) == len(reference)
    for got, want in zip(resumed, reference):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value), key


def _one_line_error(capsys, argv: list[str]) -> str:
    from vlm_post.study.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.fast
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s["arms"][0].update(stagez=[]), "stagez"),
        (lambda s: s["evaluation"].update(n="many"), "evaluation.n"),
        (
            lambda s: s["arms"][0]["stages"][0].update(config="configs/nope.yaml"),
            "arms[0] (short).stages[0].config: no such config file",
        ),
        (
            lambda s: s["arms"][1]["stages"][1].update(
                overrides=["--model.init_args.teacher.model_name_or_path=${teachr}"]
            ),
            "arms[1] (long).stages[1].overrides: ${teachr} is neither a shared stage nor an earlier stage",
        ),
        (lambda s: s["arms"][1].update(name="short"), "arms: short named twice"),
        (lambda s: s["arms"][0].update(stages=s["arms"][0]["stages"][:1]), "2 stages at least"),
        (lambda s: s["evaluation"]["datasets"][1].update(domain="sideways"), "domain"),
        (lambda s: s["evaluation"].update(pass_k=[1, 32]), "evaluation.pass_k: 32 is more than n=4"),
        # one type says it: n samples need a temperature > 0 (it was typed >= 0, then refused at 0 by a second check)
        (lambda s: s["evaluation"].update(temperature=0.0), "evaluation.temperature: Not of type PositiveFloat: 0.0"),
        (lambda s: s.update(seeds=[]), "seeds"),
        (lambda s: s["launcher"].update(kind="kubernetes"), "launcher.kind"),
    ],
)
def test_bad_study_config_is_one_line(change, expected, tiny_model, demo_data, tmp_path, capsys):
    path = tiny_study(tiny_model, demo_data, tmp_path / "configs", tmp_path / "study")
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    err = _one_line_error(capsys, ["--config", str(path), "--dry-run"])
    assert expected in err, err
    assert not (tmp_path / "study").exists()


@pytest.mark.fast
def test_missing_study_config_is_one_line(capsys, tmp_path):
    assert "no such study config" in _one_line_error(capsys, ["--config", str(tmp_path / "none.yaml")])
    assert "not a study folder" in _one_line_error(capsys, ["report", "--dir", str(tmp_path)])


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_runs_nothing(tiny_model, demo_data, tmp_path):
    config = tiny_study(tiny_model, demo_data, tmp_path / "configs", tmp_path / "study")
    result = study("--config", str(config), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "11 stages, launcher local" in result.stdout
    assert "[4] short/seed0/eval_entry (to run) after short/seed0/sft" in result.stdout
    assert f"vlm_post fit --config {tmp_path / 'configs' / 'rl.yaml'}" in result.stdout
    assert f"--model.init_args.init_from={tmp_path / 'study' / 'long/seed0/sft/export'}" in result.stdout
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_failing_stage_stops_its_arm_and_the_others_go_on(tiny_model, demo_data, tmp_path):
    path = tiny_study(tiny_model, demo_data, tmp_path / "configs", tmp_path / "study")
    config = yaml.safe_load(path.read_text())
    config["evaluation"].pop("every_k_steps")
    config["arms"][1]["stages"][0]["overrides"] = ["--trainer.max_steps=4", "--model.init_args.optim.schedule=sideways"]
    config["arms"][0]["stages"][0]["overrides"] = ["--trainer.max_steps=2"]
    path.write_text(yaml.safe_dump(config))
    result = study("--config", str(path))
    assert result.returncode == 1
    log = tmp_path / "study/long/seed0/sft/stage.log"
    assert (
        f"study: stage long/seed0/sft failed (exit 2); log: {log}; 3 stages that need it will not run" in result.stdout
    )
    assert "schedule" in log.read_text()
    assert "study: 1 stage(s) failed: long/seed0/sft" in result.stdout
    rows = json.loads((tmp_path / "study/results.json").read_text())
    assert {(r["arm"], r["point"]) for r in rows} == {("base", "entry"), ("short", "entry"), ("short", "end")}


@pytest.mark.fast
def test_paired_bootstrap_against_a_hand_computation():
    a = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.25])
    b = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.25, 0.25])
    difference, low, high = paired_bootstrap_ci(a, b, num_resamples=500, confidence=0.9, seed=3)
    # By hand: the same 500 resamples of the 8 problems (the same generator draws), both systems on each resample,
    # the difference of their means, and the 5% and 95% quantiles with linear interpolation.
    generator = torch.Generator().manual_seed(3)
    indices = torch.randint(8, (500, 8), generator=generator).tolist()
    resampled = sorted(sum(a[i].item() for i in draw) / 8 - sum(b[i].item() for i in draw) / 8 for draw in indices)

    def quantile(q: float) -> float:
        position = q * (len(resampled) - 1)
        below = int(position)
        return resampled[below] + (position - below) * (
            resampled[min(below + 1, len(resampled) - 1)] - resampled[below]
        )

    assert difference == pytest.approx((a.sum() - b.sum()).item() / 8)
    assert low == pytest.approx(quantile(0.05)) and high == pytest.approx(quantile(0.95))
    # Pairing matters: the problems both systems share cancel, so the interval is narrower than unpaired resampling.
    generator = torch.Generator().manual_seed(4)
    unpaired = sorted((a[torch.randint(8, (8,), generator=generator)].mean() - b[torch.randint(8, (8,), generator=generator)].mean()).item()
                      for _ in range(500))  # fmt: skip
    assert high - low < unpaired[474] - unpaired[25]
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap_ci(a, b[:4])


def _write_evaluation(stage, correct: dict[str, list[bool]], greedy: dict[str, bool], entropy: float = 1.0) -> None:
    """The files a finished ``vlm_post test`` leaves, for one data set, and the stage's done marker."""
    stage.eval_dir.mkdir(parents=True, exist_ok=True)
    records = [{"id": pid, "answer": "a", "greedy_correct": greedy[pid], "correct": c, "extracted": ["a" if ok else "b" for ok in c],
                "mean_token_entropy": entropy + 0.01 * index} for index, (pid, c) in enumerate(correct.items())]  # fmt: skip
    with open(stage.eval_dir / "demo_test.jsonl", "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    accuracy = sum(greedy.values()) / len(greedy)
    summary = {"dataset": "demo_test", "problems": len(records), "accuracy": accuracy, "entropy": 1.0, "ci": {}}
    (stage.eval_dir / "summary.json").write_text(json.dumps({"results": [summary]}))
    stage.mark_finished()


GREEDY = {  # per (arm, seed): greedy correctness of problems p0..p3
    ("a", 0): [1, 1, 0, 1], ("a", 1): [1, 0, 0, 1], ("b", 0): [0, 1, 0, 0], ("b", 1): [1, 0, 0, 0], (None, None): [0, 0, 0, 0]
}  # fmt: skip


def _hand_made_study(tmp_path, n: int = 2, skip=lambda stage: False, greedy=GREEDY, seeds=(0, 1), entropy=None):
    """Two arms, two seeds of hand-made evaluation files (no training): problems p0.. (one per greedy flag), two
    samples each, the first as correct as the greedy answer. ``skip(stage)`` leaves an evaluation unfinished."""
    from vlm_post.study import build_plan, load_study

    config = {"study_dir": str(tmp_path / "study"), "seeds": list(seeds),
              "arms": [{"name": n, "stages": [{"name": "sft", "config": "configs/demo/sft.yaml"},
                                               {"name": "rl", "config": "configs/demo/rl.yaml"}]} for n in ("a", "b")],
              "evaluation": {"config": "configs/demo/eval.yaml", "n": n, "bootstrap_resamples": 300,
                             "datasets": [{"name": "demo_test", "path": "unused.parquet"}]}}  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    plan = build_plan(load_study(tmp_path / "study.yaml"))
    plan.save()
    for stage in plan.stages:
        if stage.command == "test" and not skip(stage):
            flags = greedy[(stage.arm, stage.seed)]
            ids = [f"p{i}" for i in range(len(flags))]
            _write_evaluation(
                stage,
                {p: [bool(f), False] for p, f in zip(ids, flags)},
                dict(zip(ids, map(bool, flags))),
                (entropy or {}).get((stage.arm, stage.seed), 1.0),
            )
    return plan


def _study_in_another_folder(tmp_path):
    """A project folder holding a study config and its stage configs (relative paths), and a current directory that
    is not it; the RL config's max_steps (30) decides the every-10-steps evaluation points."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "configs").mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("sft.yaml", "eval.yaml"):
        shutil.copy(ROOT / "configs" / "demo" / name, project / "configs" / name)
    rl = yaml.safe_load((ROOT / "configs" / "demo" / "rl.yaml").read_text())
    rl["trainer"]["max_steps"] = 30
    (project / "configs" / "rl.yaml").write_text(yaml.safe_dump(rl))
    study = {"study_dir": "runs/study", "arms": [{"name": "a", "stages": [{"name": "sft", "config": "configs/sft.yaml"},
                                                                         {"name": "rl", "config": "configs/rl.yaml"}]}],
             "evaluation": {"config": "configs/eval.yaml", "n": 2, "every_k_steps": 10,
                            "datasets": [{"name": "demo_test", "path": "data/test.parquet"}]}}  # fmt: skip
    (project / "study.yaml").write_text(yaml.safe_dump(study))
    return project, elsewhere


@pytest.mark.fast
def test_relative_paths_of_a_study_are_relative_to_its_working_directory(tmp_path, monkeypatch):
    """One rule for every reader: the check, the step points (the RL config's max_steps), the run folders, the plan
    file, and the SLURM job all take relative paths against base_dir, here not the current directory."""
    from vlm_post.study import build_plan, load_study
    from vlm_post.study.config import LauncherConfig
    from vlm_post.study.launch import job_script

    project, elsewhere = _study_in_another_folder(tmp_path)
    monkeypatch.chdir(elsewhere)
    study = load_study(project / "study.yaml", base_dir=project)
    plan = build_plan(study, base_dir=project)
    assert plan.workdir == str(project)
    assert [s.point for s in plan.stages if s.arm == "a" and s.command == "test"] == [
        "entry", "step_10", "step_20", "end"
    ]  # fmt: skip
    rl = plan.by_key()["a/seed0/rl"]
    assert rl.run_dir == "runs/study/a/seed0/rl" and rl.marker == project / "runs/study/a/seed0/rl" / MARKER
    assert "--config" in rl.arguments and "configs/rl.yaml" in rl.arguments  # the command keeps the path as written
    assert plan.save() == project / "runs/study/study.json" and not (elsewhere / "runs").exists()
    assert Plan.load(project / "runs/study").by_key()["a/seed0/rl"].marker == rl.marker
    script = job_script(rl, LauncherConfig(kind="slurm"))
    assert f"cd {project}\n" in script and f"#SBATCH --output={project / 'runs/study/a/seed0/rl/stage.log'}" in script
    with pytest.raises(ConfigError, match="no such config file: configs/sft.yaml"):
        load_study(project / "study.yaml")  # the current directory holds no configs/


@pytest.mark.slow
def test_a_local_stage_runs_in_the_studys_working_directory(tmp_path, monkeypatch):
    from vlm_post.study import build_plan, load_study
    from vlm_post.study.config import LauncherConfig
    from vlm_post.study.launch import _start

    project, elsewhere = _study_in_another_folder(tmp_path)
    monkeypatch.chdir(elsewhere)
    plan = build_plan(load_study(project / "study.yaml", base_dir=project), base_dir=project)
    stage = plan.by_key()["a/seed0/sft"]
    stage.arguments = [*stage.arguments, "--print_config"]  # parse configs/sft.yaml, relative to the project only
    assert _start(stage, LauncherConfig()).wait(timeout=300) == 0, stage.log.read_text()[-2000:]
    assert "default_root_dir: runs/study/a/seed0/sft" in stage.log.read_text()


@pytest.mark.fast
def test_a_comparison_that_cannot_be_made_is_a_row_with_its_reason(tmp_path, monkeypatch):
    """pass@4 of two samples, and an arm whose end evaluation never finished: rows that say why, not no rows."""
    from vlm_post.study.report import Evaluation, build_report

    monkeypatch.chdir(ROOT)
    plan = _hand_made_study(tmp_path, n=4, skip=lambda stage: stage.arm == "b" and stage.point == "end")
    build_report(plan.study_dir)
    differences = json.loads((tmp_path / "study/differences.json").read_text())
    assert len(differences) == 2 * 7  # (entry, end) x the seven metrics: none dropped
    entry = {d["metric"]: d for d in differences if d["point"] == "entry"}
    assert entry["pass@4"]["difference"] is None and entry["pass@4"]["ci_low"] is None
    assert entry["pass@4"]["reason"] == "pass@4 needs 4 samples per problem; a seed 0 has 2 on some problem"
    assert entry["maj@4"]["reason"] == "maj@4 needs 4 samples per problem; a seed 0 has 2 on some problem"
    assert all(entry[m]["reason"] is None and entry[m]["difference"] is not None for m in ("accuracy", "pass@1"))
    end = [d for d in differences if d["point"] == "end"]
    assert all(d["reason"] == "no seed has both arms' evaluation finished" and d["seeds"] == [] for d in end)
    markdown = (tmp_path / "study/results.md").read_text()
    assert "| a − b | entry | demo_test | pass@4 | – | not compared: pass@4 needs 4 samples" in markdown
    assert "| maj@4 entry | maj@4 end |" in markdown  # the main table's columns

    def broken(self, metric):  # a bug in per_problem is not a comparison that cannot be made
        raise KeyError(metric)

    monkeypatch.setattr(Evaluation, "per_problem", broken)
    with pytest.raises(KeyError):
        build_report(plan.study_dir)


@pytest.mark.fast
def test_seeds_that_differ_widen_the_interval_and_seeds_that_agree_do_not(tmp_path, monkeypatch):
    """Hand-made files with a known seed effect: arm a's three seeds answer alike, arm b's differ by a constant
    (seed 1 solves 4 more of 16 problems than seed 0, seed 2 4 more again). Their intervals over seeds and problems:
    a's is its problems-only interval, b's is wider; the table says which one it shows."""
    from vlm_post.study.report import build_report

    monkeypatch.chdir(ROOT)
    base = [1, 0] * 4 + [0] * 8  # 4 of 16
    shifted = {0: base, 1: [1] * 4 + base[4:], 2: [1] * 8 + base[8:]}  # a constant +4 problems a seed
    greedy = {("a", s): [1, 1, 0, 1] * 4 for s in (0, 1, 2)} | {("b", s): shifted[s] for s in (0, 1, 2)}
    plan = _hand_made_study(tmp_path, greedy={**greedy, (None, None): [0] * 16}, seeds=(0, 1, 2))
    build_report(plan.study_dir)
    pooled = {(r["arm"], r["point"]): r for r in json.loads((tmp_path / "study/results.json").read_text())
              if "seeds" in r}  # fmt: skip
    a, b = pooled[("a", "entry")], pooled[("b", "entry")]
    assert a["seeds"] == b["seeds"] == [0, 1, 2] and a["problems"] == b["problems"] == 16
    assert (a["accuracy_ci_low"], a["accuracy_ci_high"]) == (
        a["accuracy_ci_problems_low"],
        a["accuracy_ci_problems_high"],
    )
    width = lambda row, kind: row[f"accuracy_{kind}_high"] - row[f"accuracy_{kind}_low"]
    assert width(b, "ci") > 1.2 * width(b, "ci_problems") > 0
    markdown = (tmp_path / "study/results.md").read_text()
    assert "over seeds and problems" in markdown


@pytest.mark.fast
def test_problems_or_seeds_one_run_lacks_are_warned_about_and_shown(tmp_path, monkeypatch, capsys):
    """b's seed 1 lacks problem p3, a's seed 0 lists p1 twice, and only arm a ran seed 2 at entry: each is a warning
    line naming the arm, set and count; results.md gives the problems and seeds of each row, and a cell's mean and
    interval are over the same problems."""
    from vlm_post.study.report import build_report

    monkeypatch.chdir(ROOT)
    greedy = {**GREEDY, ("b", 1): [1, 0, 0], ("a", 2): [1, 1, 1, 1], ("b", 2): [0, 0, 0, 0]}
    plan = _hand_made_study(tmp_path, greedy=greedy, seeds=(0, 1, 2),
                            skip=lambda stage: (stage.arm, stage.seed) == ("b", 2))  # fmt: skip
    duplicated = plan.by_key()["a/seed0/eval_entry"].eval_dir / "demo_test.jsonl"
    lines = duplicated.read_text().splitlines()
    duplicated.write_text("\n".join([*lines, lines[1]]) + "\n")
    capsys.readouterr()
    build_report(plan.study_dir)
    out = capsys.readouterr().out
    assert "warning: a seed 0 entry demo_test: 1 duplicate problem ids (first 'p1')" in out
    assert "warning: a − b entry demo_test: seed(s) 2 run by a only (not by b); compared on seeds 0, 1" in out
    lacks = "b seed 1 entry demo_test lacks 1 problem(s) that other runs have; compared on the 3 all of them have"
    assert f"warning: a − b entry demo_test: {lacks}" in out and out.count(lacks) == 2  # a − b, and b over seeds
    differences = json.loads((tmp_path / "study/differences.json").read_text())
    entry = next(d for d in differences if (d["point"], d["metric"]) == ("entry", "accuracy"))
    assert entry["problems"] == 3 and entry["seeds"] == [0, 1]
    markdown = (tmp_path / "study/results.md").read_text()
    assert "| a − b | entry | demo_test | accuracy |" in markdown and "| 3 | 0, 1 |" in markdown
    # b at entry: seeds 0 and 1 on the problems both have (p0..p2): [0, 1, 0] and [1, 0, 0], 1/3 each
    assert "| b | entry | demo_test | in | 0.333 ±0.000 [" in markdown and "| 3 | 0, 1 |" in markdown


@pytest.mark.fast
def test_entropy_gets_a_paired_difference_and_intervals(tmp_path, monkeypatch):
    """Per-problem token-mean entropy from the evaluation files: a's is b's + 0.4 on every problem at entry (and
    seed 1 of a 0.2 higher still), so a − b is 0.5 over seeds, with an interval that holds it."""
    from vlm_post.study.report import build_report

    monkeypatch.chdir(ROOT)
    entropy = {("a", 0): 1.4, ("a", 1): 1.6, ("b", 0): 1.0, ("b", 1): 1.0}
    plan = _hand_made_study(tmp_path, entropy=entropy)
    build_report(plan.study_dir)
    differences = json.loads((tmp_path / "study/differences.json").read_text())
    entry = next(d for d in differences if (d["point"], d["metric"]) == ("entry", "mean_token_entropy"))
    assert entry["difference"] == pytest.approx(0.5) and entry["seed_sd"] == pytest.approx(0.2 * 2**-0.5)
    assert entry["ci_problems_low"] == pytest.approx(0.5) == entry["ci_problems_high"]  # the same shift on each problem
    assert entry["ci_low"] == pytest.approx(0.4) and entry["ci_high"] == pytest.approx(0.6)  # the seeds: 0.4 or 0.6
    pooled = next(r for r in json.loads((tmp_path / "study/results.json").read_text())
                  if "seeds" in r and (r["arm"], r["point"]) == ("a", "entry"))  # fmt: skip
    assert pooled["mean_token_entropy"] == pytest.approx(1.5 + 0.015)  # problems p0..p3 add 0, .01, .02, .03
    assert "| a − b | entry | demo_test | mean_token_entropy | +0.500 |" in (tmp_path / "study/results.md").read_text()


@pytest.mark.fast
def test_report_over_seeds_averages_problems_and_gives_the_seed_spread(tmp_path, monkeypatch):
    """Two arms, two seeds, hand-made evaluation files: the paired difference pools seeds per problem."""
    from vlm_post.study.report import build_report

    monkeypatch.chdir(ROOT)
    plan = _hand_made_study(tmp_path)
    build_report(plan.study_dir)
    rows = json.loads((tmp_path / "study/results.json").read_text())
    assert len([r for r in rows if "seeds" not in r]) == 1 + 2 * 2 * 2  # base; 2 arms x 2 seeds x (entry, end)
    pooled = [r for r in rows if "seeds" in r]
    assert len(pooled) == 2 * 2 and all(r["seeds"] == [0, 1] for r in pooled)  # 2 arms x (entry, end)
    difference = next(d for d in json.loads((tmp_path / "study/differences.json").read_text())
                      if (d["point"], d["metric"]) == ("entry", "accuracy"))  # fmt: skip
    # Per seed: a - b = 3/4 - 1/4 = 0.5 (seed 0) and 2/4 - 1/4 = 0.25 (seed 1); pooled 0.375. Their spread is the
    # sample SD (n - 1): sqrt(((0.5 - 0.375)^2 + (0.25 - 0.375)^2) / 1) = 0.1768 (the population SD was 0.125).
    assert difference["seeds"] == [0, 1] and difference["difference"] == pytest.approx(0.375)
    assert difference["seed_sd"] == pytest.approx(0.125 * 2**0.5)
    pooled_a, pooled_b = torch.tensor([1.0, 0.5, 0.0, 1.0]), torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert (difference["ci_problems_low"], difference["ci_problems_high"]) == pytest.approx(
        paired_bootstrap_ci(pooled_a, pooled_b, 300)[1:]
    )
    seeds_a = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]])  # (seed, problem)
    seeds_b = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert (difference["ci_low"], difference["ci_high"]) == pytest.approx(
        seed_problem_bootstrap_ci([seeds_a, seeds_b], [1.0, -1.0], 300)[1:]
    )
    markdown = (tmp_path / "study/results.md").read_text()
    assert "| a | 0.625 ±0.177 [" in markdown  # in-domain accuracy at entry: seeds 0.75 and 0.5, sample SD
    # The figures' CSVs carry each point's interval: one per seed (problems), and the seeds pooled (`seed: all`).
    for name, value in (("accuracy_vs_step", "accuracy"), ("pass_at_k", "pass_at_k")):
        rows = _csv(tmp_path / "study/figures" / f"{name}.csv")
        pooled = [r for r in rows if r["seed"] == "all"]
        assert pooled and {r["seed"] for r in rows} >= {"0", "1", "all"}, name
        assert all(r["ci_low"] != "" for r in pooled), name  # (these hand-made summaries carry no interval)
        bounded = [r for r in rows if r["ci_low"] != ""]
        assert all(float(r["ci_low"]) <= float(r[value]) <= float(r["ci_high"]) for r in bounded), name
    entry = next(r for r in _csv(tmp_path / "study/figures/accuracy_vs_step.csv")
                 if (r["arm"], r["seed"], r["step"]) == ("a", "all", "0"))  # fmt: skip
    assert float(entry["accuracy"]) == pytest.approx(0.625)
