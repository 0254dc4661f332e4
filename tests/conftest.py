"""Shared fixtures: a tiny Qwen2.5-VL and small synthetic data, built offline once per session."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
GEO3K_SAMPLE = SHARED_DATA / "geometry3k-sample" / "sample-00000-of-00001.parquet"
MATHVISTA_TESTMINI = SHARED_DATA / "mathvista-testmini" / "testmini.json"

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the shared real-data samples are not at {SHARED_DATA} (outside the workspace)"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from vlm_post.data.synthetic import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", train=128, validation=16, test=16)


@pytest.fixture(scope="session")
def processor(tiny_model):
    from vlm_post.models.loading import load_processor

    return load_processor(str(tiny_model))


# Two tiers, `make test-fast` (-m fast) and `make test` (everything). Every test is in exactly one: its module's
# `pytestmark` names the tier, or, in a module that holds both, each test names its own. A test in neither tier, or
# in both (`-m fast` would pick it although it is slow), stops the collection: no test can be silently dropped or
# misfiled. A fast test may not fit, validate or test through a Trainer, nor start the CLI or SLURM in a subprocess
# (`_fast_tier_guard`), so the fast tier stays fast as the code changes.
TIERS = ("fast", "slow")


def pytest_collection_modifyitems(config, items):
    wrong = [f"{item.nodeid} ({' and '.join(_tiers(item)) or 'no tier'})" for item in items if len(_tiers(item)) != 1]
    if wrong:
        listing = "\n  ".join(wrong[:20]) + ("\n  ..." if len(wrong) > 20 else "")
        raise pytest.UsageError(
            f"{len(wrong)} tests are not in exactly one tier (mark each fast or slow; see tests/conftest.py):\n  {listing}"
        )


def _tiers(item) -> list[str]:
    return sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})


# What a fast test may not start: the CLI (its console script or ``-m vlm_post``), torchrun, or SLURM's daemons and
# commands. Helper processes of the code under test (the grader's sympy workers) are fine.
_SLOW_EXECUTABLES = {"vlm_post", "sbatch", "srun", "salloc", "slurmctld", "slurmd", "munged"}
_SLOW_MODULES = {"vlm_post", "torch.distributed.run"}


def _is_slow_command(args) -> bool:
    words = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    if words and Path(words[0]).name in _SLOW_EXECUTABLES:
        return True
    return any(flag == "-m" and module in _SLOW_MODULES for flag, module in itertools.pairwise(words))


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    if _tiers(request.node) != ["fast"]:
        return
    import subprocess

    from lightning.pytorch import Trainer

    def refuse_run(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} is marked fast but runs a Trainer: mark it slow")

    popen_init = subprocess.Popen.__init__

    def checked_popen(self, args, *rest, **kwargs):
        if _is_slow_command(args):
            raise AssertionError(f"{request.node.nodeid} is marked fast but runs {args!r}: mark it slow")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(Trainer, "_run", refuse_run)
    monkeypatch.setattr(subprocess.Popen, "__init__", checked_popen)
