"""Shared fixtures: a tiny Qwen2.5-VL and small synthetic data, built offline once per session."""

from __future__ import annotations

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
