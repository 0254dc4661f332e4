"""A real one-node SLURM cluster for the launcher tests: munged, slurmctld and slurmd, in a temporary folder.

Debian's ``slurm-wlm`` and ``munge`` (``make test`` installs them); the tests that need it skip with a reason
where they are absent. Everything SLURM writes (spool, state, logs, pid files) goes to the folder, and the
daemons are stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue")


def missing() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def start_munge() -> None:
    """munged as the munge user, with a key made by ``mungekey -c`` if there is none (as root only)."""
    if _run("munge", "-n").returncode == 0:
        return  # already running
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run("mungekey", "-c", "-k", str(key))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for folder in (Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    result = _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
    if result.returncode != 0 or _run("munge", "-n").returncode != 0:
        raise RuntimeError(f"munged did not start: {result.stderr.strip()}")


def write_config(folder: Path) -> Path:
    host, cpus = socket.gethostname(), os.cpu_count() or 1
    for sub in ("spool", "state"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    config = folder / "slurm.conf"
    config.write_text(
        "\n".join(
            [
                "ClusterName=vlmpost",
                f"SlurmctldHost={host}",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SlurmUser=root",
                "SlurmdUser=root",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "ReturnToService=2",
                "SchedulerType=sched/backfill",
                "JobCompType=jobcomp/none",
                "AccountingStorageType=accounting_storage/none",
                "MinJobAge=300",  # finished jobs stay visible to squeue for 5 minutes
                f"StateSaveLocation={folder / 'state'}",
                f"SlurmdSpoolDir={folder / 'spool'}",
                f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
                f"SlurmdPidFile={folder / 'slurmd.pid'}",
                f"SlurmctldLogFile={folder / 'slurmctld.log'}",
                f"SlurmdLogFile={folder / 'slurmd.log'}",
                f"NodeName={host} CPUs={cpus} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return config


class SlurmCluster:
    """Start with ``start()``; ``env`` points sbatch/squeue at it; ``stop()`` ends both daemons."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = write_config(folder)
        self.env = {**os.environ, "SLURM_CONF": str(self.config)}

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        start_munge()
        for daemon in ("slurmctld", "slurmd"):
            result = _run(f"/usr/sbin/{daemon}", "-f", str(self.config), env=self.env)
            if result.returncode != 0:
                raise RuntimeError(
                    f"{daemon} did not start: {result.stderr.strip()} (log: {self.folder / (daemon + '.log')})"
                )
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = _run("sinfo", "-h", "-o", "%T", env=self.env).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not come up (state {state!r}); see {self.folder}/slurm*.log")

    def stop(self) -> None:
        for daemon in ("slurmd", "slurmctld"):
            pid_file = self.folder / f"{daemon}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
