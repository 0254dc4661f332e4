"""Running a plan's stages: ``local`` subprocesses, or ``slurm`` jobs chained with ``--dependency=afterok``.

Both launchers skip a stage that finished (its marker, and its export or evaluation), resume an interrupted fit
from its ``last.ckpt`` (``Stage.argv``), and log each attempt to ``<run_dir>/stage.log``. A failed stage stops
the stages that wait for it, with one line naming the stage and its log; the other arms go on.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from vlm_post.errors import ConfigError
from vlm_post.study.config import LauncherConfig
from vlm_post.study.plan import Plan, Stage


def say(message: str) -> None:
    print(f"study: {message}", flush=True)


@contextmanager
def study_lock(study_dir: str):
    """One ``vlm_post study`` at a time per study folder: a second would run the same stages twice."""
    Path(study_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(study_dir) / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another 'vlm_post study' is running on {study_dir}") from None
        yield


def python_command(launcher: LauncherConfig) -> list[str]:
    return [launcher.python or sys.executable, "-m", "vlm_post"]


def stage_command(stage: Stage, launcher: LauncherConfig) -> str:
    """The exact command a stage's process runs (in ``stage.workdir``), as both launchers start it."""
    return shlex.join([*python_command(launcher), *stage.argv()])


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the study process dies, however it dies (no orphaned stage keeps training)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_local(plan: Plan, launcher: LauncherConfig) -> list[str]:
    """Run every unfinished stage, up to ``max_parallel`` at once; returns the keys of the stages that failed."""
    todo = [stage for stage in plan.stages if not stage.finished()]
    finished = {stage.key for stage in plan.stages} - {stage.key for stage in todo}
    total, failed, blocked = len(plan.stages), [], set()
    if finished:
        say(f"{len(finished)} of {total} stages already finished, skipped")
    running: dict[str, tuple[subprocess.Popen, Stage, float]] = {}
    try:
        while todo or running:
            for stage in list(todo):
                if len(running) >= launcher.max_parallel:
                    break
                if stage.key in blocked:
                    todo.remove(stage)
                elif set(stage.needs) <= finished:
                    todo.remove(stage)
                    resume = stage.resume_checkpoint()
                    running[stage.key] = (_start(stage, launcher), stage, time.time())
                    resumed = f" (resuming {resume})" if resume else ""
                    say(f"[{len(finished)}/{total} done] running {stage.key}{resumed}; log: {stage.log}")
            if not running:
                if any(stage.key not in blocked for stage in todo):  # cannot happen: needs come first in the plan
                    raise RuntimeError(f"study: {[s.key for s in todo]} wait for stages that are not in the plan")
                continue  # only blocked stages were left: the loop drops them
            time.sleep(0.2)
            for key, (process, stage, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[key]
                problem = f"exit {process.returncode}" if process.returncode else stage.output_problem()
                if problem is None:
                    stage.mark_finished()
                    finished.add(key)
                    say(f"[{len(finished)}/{total} done] finished {key} in {time.time() - started:.0f} s")
                else:
                    failed.append(key)
                    stuck = plan.dependents(key)
                    blocked |= stuck
                    skipped = f"; {len(stuck)} stages that need it will not run" if stuck else ""
                    say(f"stage {key} failed ({problem}); log: {stage.log}{skipped}")
    finally:
        for process, _, _ in running.values():  # interrupted: stop the stages still running (they resume later)
            process.terminate()
    return failed


def _start(stage: Stage, launcher: LauncherConfig) -> subprocess.Popen:
    stage.run_path.mkdir(parents=True, exist_ok=True)
    argv = [*python_command(launcher), *stage.argv()]
    log = open(stage.log, "a")  # noqa: SIM115 (the child writes it until it exits)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # preexec_fn is safe here: the study process runs no threads
    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=stage.workdir,  # the study's working directory: the stage's relative paths are relative to it
        preexec_fn=_die_with_parent,  # noqa: PLW1509
    )
    log.close()
    return process


# --- SLURM -----------------------------------------------------------------------------------------------------


def job_script(stage: Stage, launcher: LauncherConfig) -> str:
    """The stage's sbatch script: its resources, then ``srun`` of the stage command, then its marker."""
    resources, servers = stage.slurm, stage.slurm.vllm_servers
    gpus = resources.gpus_per_node or 0
    tasks = gpus or resources.tasks_per_node or 1
    nodes = (resources.nodes or 1) + (servers.nodes if servers else 0)
    lines = ["#!/bin/bash", f"#SBATCH --job-name=vlm_post:{stage.key}", f"#SBATCH --output={stage.log}",
             "#SBATCH --open-mode=append", f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={tasks}"]  # fmt: skip
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if resources.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={resources.cpus_per_task}")
    if resources.time:
        lines.append(f"#SBATCH --time={resources.time}")
    if resources.partition:
        lines.append(f"#SBATCH --partition={resources.partition}")
    lines += [line if line.startswith("#SBATCH") else f"#SBATCH {line}" for line in resources.extra]
    marker = json.dumps({"key": stage.key, "command": stage.shell(), "slurm_job": "${SLURM_JOB_ID}"})
    lines += ["set -euo pipefail", f"cd {shlex.quote(stage.workdir)}", *launcher.setup,
              f"echo \"=== $(date '+%F %T') job $SLURM_JOB_ID: {stage.key}\"",
              *stage_run_lines(stage, launcher),
              _check_outputs(stage),
              f"echo {shlex.quote(marker)} | sed \"s/\\${{SLURM_JOB_ID}}/$SLURM_JOB_ID/\" > {shlex.quote(str(stage.marker))}.tmp",
              f"mv {shlex.quote(str(stage.marker))}.tmp {shlex.quote(str(stage.marker))}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def stage_run_lines(stage: Stage, launcher: LauncherConfig) -> list[str]:
    """The job script's lines that run the stage: ``srun`` of its command; with ``slurm.vllm_servers``, first a vLLM
    server on each of the job's last ``vllm_servers.nodes`` nodes (docs/rollout.md's command, over the node's GPUs),
    then the stage on the other nodes given their addresses, then the servers stopped."""
    resources, servers = stage.slurm, stage.slurm.vllm_servers
    if servers is None:
        return [f"srun {stage_command(stage, launcher)}"]
    trainer_nodes, gpus = resources.nodes or 1, resources.gpus_per_node or 0
    from vlm_post.rollout.vllm_server import SERVER_FLAGS

    serve = [launcher.python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", servers.model,
             "--port", str(servers.port), *SERVER_FLAGS, *servers.args]  # fmt: skip
    step = f'--nodes=1 --ntasks=1{f" --gpus-per-task={gpus}" if gpus else ""} --nodelist="$node"'
    log = shlex.quote(str(stage.run_path / "vllm_server"))
    return ['nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
            f'trainer_nodes=$(IFS=,; echo "${{nodes[*]:0:{trainer_nodes}}}")',
            "server_urls=''",
            f'for node in "${{nodes[@]:{trainer_nodes}}}"; do',
            f"  VLLM_SERVER_DEV_MODE=1 srun {step} --output={log}_%N.log {shlex.join(serve)} &",
            f'  server_urls="${{server_urls:+$server_urls,}}http://$node:{servers.port}"',
            "done",
            (f'srun --nodes={trainer_nodes} --nodelist="$trainer_nodes" {stage_command(stage, launcher)} '
             '"--model.init_args.vllm.server_urls=[$server_urls]"'),
            "kill $(jobs -p) 2>/dev/null || true  # the servers"]  # fmt: skip


def _check_outputs(stage: Stage) -> str:
    """The shell form of ``Stage.output_problem``: fail the job (no marker) when the expected output is absent."""
    needed = stage.expected_output
    path = shlex.quote(str(needed))
    return f'test -f {path} || {{ echo "study: stage {stage.key} exited 0 but wrote no {needed}"; exit 1; }}'


def run_slurm(plan: Plan, launcher: LauncherConfig) -> list[str]:
    """Submit every unfinished stage (``afterok`` on the jobs it needs) and a report job after them all.

    A stage whose job from an earlier submission is still queued or running is not submitted again: later jobs
    depend on that job. With ``launcher.wait`` this waits for the queue and returns the failed stages.
    """
    live = _live_jobs()
    jobs: dict[str, str] = {}
    record = []
    for stage in plan.stages:
        if stage.finished():
            continue
        job_file = stage.run_path / "slurm_job_id"
        earlier = job_file.read_text().strip() if job_file.is_file() else None
        if earlier in live:
            jobs[stage.key] = earlier
            say(f"{stage.key}: job {earlier} from an earlier submission is still queued or running")
            continue
        stage.run_path.mkdir(parents=True, exist_ok=True)
        script = stage.run_path / "job.sbatch"
        script.write_text(job_script(stage, launcher))
        parents = [jobs[key] for key in stage.needs if key in jobs]
        command = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
        command += [f"--dependency=afterok:{':'.join(parents)}"] if parents else []
        jobs[stage.key] = _sbatch([*command, str(script)])
        job_file.write_text(jobs[stage.key] + "\n")
        record.append({"stage": stage.key, "job": jobs[stage.key], "command": [*command, str(script)]})
        say(f"submitted {stage.key} as job {jobs[stage.key]}" + (f" (after {', '.join(parents)})" if parents else ""))
    if jobs:
        report = plan.study_path / "report.sbatch"
        report.write_text(_report_script(plan, launcher))
        command = ["sbatch", "--parsable", f"--dependency=afterany:{':'.join(jobs.values())}", str(report)]
        record.append({"stage": "report", "job": _sbatch(command), "command": command})
        say(f"submitted the report as job {record[-1]['job']}, after every stage")
    (plan.study_path / "slurm_jobs.json").write_text(json.dumps(record, indent=2) + "\n")
    if not launcher.wait:
        return []
    waiting = {entry["job"] for entry in record}
    while waiting & _live_jobs():
        time.sleep(launcher.poll_s)
    failed = [stage.key for stage in plan.stages if stage.key in jobs and not stage.finished()]
    for key in failed:
        say(f"stage {key} did not finish (job {jobs[key]}); log: {plan.by_key()[key].log}")
    return failed


def _report_script(plan: Plan, launcher: LauncherConfig) -> str:
    report = shlex.join([*python_command(launcher), "study", "report", "--dir", plan.study_dir])
    lines = ["#!/bin/bash", "#SBATCH --job-name=vlm_post:report", f"#SBATCH --output={plan.study_path / 'report.log'}",
             "#SBATCH --ntasks=1", *[f"#SBATCH {line}" if not line.startswith("#SBATCH") else line for line in launcher.slurm.extra],
             *([f"#SBATCH --partition={launcher.slurm.partition}"] if launcher.slurm.partition else []),
             f"cd {shlex.quote(plan.workdir)}", *launcher.setup, report]  # fmt: skip
    return "\n".join(lines) + "\n"


def _sbatch(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise ConfigError("launcher.kind: slurm, but there is no 'sbatch' on this machine's PATH") from None
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused {command[-1]}: {' '.join(result.stderr.split()) or result.returncode}")
    return result.stdout.strip().split(";")[0]


def _live_jobs() -> set[str]:
    """Job ids SLURM still has queued or running (of this user)."""
    try:
        result = subprocess.run(["squeue", "-h", "-u", pwd.getpwuid(os.getuid()).pw_name, "-o", "%i"],
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    except FileNotFoundError:
        raise ConfigError("launcher.kind: slurm, but there is no 'squeue' on this machine's PATH") from None
    if result.returncode != 0:
        raise ConfigError(f"squeue failed: {' '.join(result.stderr.split())}")
    return set(result.stdout.split())
