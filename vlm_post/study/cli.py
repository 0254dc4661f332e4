"""``vlm_post study``: run a warm-start study, or rebuild its report.

    vlm_post study --config configs/study/demo.yaml             # run every unfinished stage, then the report
    vlm_post study --config configs/study/demo.yaml --dry-run   # the stage graph and the exact commands
    vlm_post study report --dir runs/study/demo                 # results.json, results.md, figures, no training
    vlm_post study --config configs/study/demo.yaml --seeds=[1] --study_dir=runs/study/demo-seed1   # keys overridden

Rerunning the same command after an interruption (even SIGKILL) skips the finished stages and resumes the
interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from vlm_post.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm_post study", description=__doc__.split("\n\n")[0],
        epilog="Any other --key=value overrides that key of the study config (--seeds=[0,1,2], --study_dir=DIR).",
    )  # fmt: skip
    parser.add_argument("--config", help="the study config (configs/study/*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its commands; run nothing")
    return parser


def describe(plan, launcher) -> str:
    """The stage graph and each stage's exact command, as its process runs it (the SLURM job and its resources
    with ``slurm``)."""
    from vlm_post.study.launch import job_script, stage_command, stage_run_lines

    head = f"study {plan.study_dir}: {len(plan.stages)} stages, launcher {launcher.kind}"
    lines = [f"{head}; every command runs in {plan.workdir}"]
    for number, stage in enumerate(plan.stages, 1):
        state = (
            "finished"
            if stage.finished()
            else ("resumes " + str(stage.resume_checkpoint()) if stage.resume_checkpoint() else "to run")
        )
        after = f" after {', '.join(stage.needs)}" if stage.needs else ""
        lines.append(f"\n[{number}] {stage.key} ({state}){after}")
        if launcher.kind == "slurm":
            sbatch = [line for line in job_script(stage, launcher).splitlines() if line.startswith("#SBATCH")]
            dependency = f" --dependency=afterok:{':'.join('<' + k + '>' for k in stage.needs)}" if stage.needs else ""
            lines.append(f"  sbatch{dependency} {stage.run_path / 'job.sbatch'}")
            lines.append("    " + " ".join(line.removeprefix("#SBATCH ") for line in sbatch))
            lines += [f"    {line}" for line in stage_run_lines(stage, launcher)]
        else:
            lines.append(f"  {stage_command(stage, launcher)}")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    from vlm_post.study.config import load_study
    from vlm_post.study.launch import run_local, run_slurm, say, study_lock
    from vlm_post.study.plan import build_plan
    from vlm_post.study.report import build_report

    if argv[:1] == ["report"]:
        report = argparse.ArgumentParser(prog="vlm_post study report", description="Rebuild a study's report.")
        report.add_argument("--dir", required=True, help="the study folder (study_dir)")
        written = build_report(report.parse_args(argv[1:]).dir)
        print("\n".join(f"wrote {path}" for path in written.values()))
        return 0
    args, overrides = _parser().parse_known_args(argv)
    if not args.config:
        raise ConfigError("--config: vlm_post study needs a study config (see 'vlm_post study --help')")
    study = load_study(args.config, overrides)
    plan = build_plan(study)  # the current directory is the study's working directory (docs/study.md)
    if args.dry_run:
        print(describe(plan, study.launcher))
        return 0
    with study_lock(plan.study_path):
        plan.save()
        failed = (run_slurm if study.launcher.kind == "slurm" else run_local)(plan, study.launcher)
        if study.launcher.kind == "local" or study.launcher.wait:
            for path in build_report(plan.study_path).values():
                if path.suffix == ".md":
                    print("\n" + path.read_text())
            say(f"report in {study.study_dir}: results.json, results.md, differences.json, figures/")
    if failed:
        say(f"{len(failed)} stage(s) failed: {', '.join(failed)}")
        return 1
    return 0


def main(argv: list[str]) -> None:
    try:
        code = run(argv)
    except ConfigError as error:
        sys.stderr.write(f"vlm_post study: error: {error}\n")
        code = 2
    except KeyboardInterrupt:
        sys.stderr.write("vlm_post study: interrupted; rerun the same command to go on where it stopped\n")
        code = 130
    sys.exit(code)
