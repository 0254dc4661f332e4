"""Sharded training on 2 CPU processes (gloo): FSDP2 through Lightning's ModelParallelStrategy, from the CLI.

The demo's configs/demo/sft_fsdp.yaml, pointed at the tiny model and data, against configs/demo/sft.yaml in one
process with the same global batch: the same weights and validation metrics, a sharded checkpoint that resumes to
the uninterrupted run's weights, and an HF export that holds the full weights. RL and OPD take steps under it too.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

VLM_POST = str(Path(sys.executable).parent / "vlm_post")
STRATEGY = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
}


def fsdp1_strategy(**options) -> dict:
    """configs/geo3k/sft_qwen2_5_vl_7b.yaml's FSDP1 strategy, through the CPU subclass in tests/cpu_fsdp1.py."""
    recipe = yaml.safe_load((ROOT / "configs/geo3k/sft_qwen2_5_vl_7b.yaml").read_text())["trainer"]["strategy"]
    init_args = {**recipe["init_args"], "process_group_backend": "gloo", **options}
    return {"class_path": "tests.cpu_fsdp1.CPUFSDPStrategy", "init_args": init_args}


def rank_zero_length_reward(responses, examples):
    """Rank 0's groups differ in reward, rank 1's are all equal: dynamic sampling keeps rows on rank 0 only."""
    import torch.distributed as dist

    return [len(text) / 10.0 if dist.get_rank() == 0 else 1.0 for text in responses]


def fit(config: dict, path: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # ROOT: tests.test_rl's reward
    result = subprocess.run(
        [VLM_POST, "fit", "--config", str(path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def demo_config(name: str, tiny_model: Path, demo_data: Path, run: Path, **trainer) -> dict:
    config = yaml.safe_load((ROOT / "configs/demo" / name).read_text())
    config["model"]["init_args"]["model_name_or_path"] = str(tiny_model)
    config["model"]["init_args"].pop("init_from", None)
    config["data"]["train"]["path"] = str(demo_data / "train.parquet")
    for source in config["data"].get("val", []):
        source["path"] = str(demo_data / "validation.parquet")
    config["trainer"].update(default_root_dir=str(run), log_every_n_steps=1, **trainer)
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"].get("callbacks", []) if not c["class_path"].endswith("EarlyStopping")
    ]
    return config


def exported(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], msg=name, **tolerance)


@pytest.fixture(scope="module")
def sft_runs(tiny_model, demo_data, tmp_path_factory) -> dict[str, Path]:
    """One process (batch 16), 2 FSDP2 processes and 2 FSDP1 processes (8 each) for 3 steps, validation at step 3;
    and each sharded run stopped at step 2, then resumed from its last.ckpt to step 3 (FSDP1 both from a sharded
    folder and from a full-state file)."""
    root = tmp_path_factory.mktemp("distributed")
    runs = {}
    steps = dict(max_steps=3, val_check_interval=3)
    for label, name in (("single", "sft.yaml"), ("fsdp", "sft_fsdp.yaml"), ("fsdp1", "sft_fsdp.yaml")):
        runs[label] = root / label
        config = demo_config(name, tiny_model, demo_data, runs[label], **steps)
        if label == "fsdp1":
            config["trainer"]["strategy"] = fsdp1_strategy()
        # The sharded runs export their best checkpoint (loaded back in place): with one validation, at the last
        # step, the same weights as the single-process run's final ones.
        config["export"] = {"weights": "last" if label == "single" else "best"}
        # 15 validation problems: 8 + 7 over two ranks, the second topped up with a filler that must not count.
        config["data"]["val"][0]["limit"] = 15
        config["data"]["eval_batch_size"] = 8 if label == "single" else 4
        config["model"]["init_args"]["val"]["n"] = 4  # samples too: mean@n, pass@k, entropy, diversity
        config["model"]["init_args"]["val"]["top_k"] = 1  # deterministic samples: the same on any rank
        config["trainer"]["logger"] = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(runs[label])},
        }
        fit(config, root / f"{label}.yaml")
    for label, strategy in (("resumed", None), ("fsdp1_resumed", fsdp1_strategy())):
        runs[label] = root / label
        config = demo_config("sft_fsdp.yaml", tiny_model, demo_data, runs[label], max_steps=2, val_check_interval=2)
        if strategy:
            config["trainer"]["strategy"] = strategy
        config["export"] = {"weights": "last"}
        fit(config, root / f"{label}_first.yaml")
        config["trainer"].update(max_steps=3, val_check_interval=3)
        fit(config, root / f"{label}.yaml", f"--ckpt_path={runs[label] / 'checkpoints' / 'last.ckpt'}")
    # FSDP1 with full-state checkpoint files, 2 steps; then restored from its last.ckpt with nothing left to train,
    # exporting what it restored. (Resuming to step 3 is not compared: on CPU processes torch's full optimizer-state
    # gather returns exp_avg and exp_avg_sq in one shared buffer, so the file's Adam moments are wrong there.)
    runs["fsdp1_full"] = root / "fsdp1_full"
    config = demo_config("sft_fsdp.yaml", tiny_model, demo_data, runs["fsdp1_full"], max_steps=2, val_check_interval=2)
    config["trainer"]["strategy"] = fsdp1_strategy(state_dict_type="full")
    config["export"] = {"weights": "last"}
    fit(config, root / "fsdp1_full.yaml")
    config["export"]["dirpath"] = str(runs["fsdp1_full"] / "export_restored")
    fit(config, root / "fsdp1_full_restored.yaml", f"--ckpt_path={runs['fsdp1_full'] / 'checkpoints' / 'last.ckpt'}")
    return runs


def validation_metrics(run: Path) -> dict[str, float]:
    with open(next(run.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get("val/demo_val/accuracy")]
    assert len(logged) == 1, logged
    return {key: float(value) for key, value in logged[0].items() if key.startswith("val/") and value}


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp1"])
def test_sharded_sft_takes_the_single_process_steps(sft_runs, strategy):
    """The same global batch of 16, split 8 + 8 over two ranks: the weights after 3 steps equal one process's,
    and so do the validation metrics (each rank grades its share of the 15 problems, torchmetrics sums the counts;
    the filler is left out). FSDP2 (ModelParallelStrategy) and FSDP1 (FSDPStrategy) alike."""
    assert_same_weights(exported(sft_runs[strategy]), exported(sft_runs["single"]), rtol=1e-4, atol=1e-5)
    provenance = json.loads((sft_runs[strategy] / "export" / "vlm_post_export.json").read_text())
    weights = Path(provenance["weights"])  # the best checkpoint, a sharded folder, loaded back in place
    assert weights.is_dir() and weights.name.startswith("step3")
    single, sharded = validation_metrics(sft_runs["single"]), validation_metrics(sft_runs[strategy])
    assert {"val/demo_val/loss", "val/demo_val/response_length", "val/demo_val/entropy", "val/demo_val/pass@4"} <= set(
        single
    )
    assert single.keys() == sharded.keys()
    for key in single:
        assert sharded[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key


def test_sharded_checkpoint_resumes_and_export_gathers_full_weights(sft_runs):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from vlm_post.models.loading import load_policy

    last = sft_runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2, "not one shard file per rank"
    # The export (gathered from the shards) equals what the sharded checkpoint holds, tensor for tensor.
    full = sft_runs["fsdp"] / "full.pt"
    dcp_to_torch_save(last, full)
    state = torch.load(full, weights_only=True)["state_dict"]
    sharded = {name.removeprefix("policy."): value for name, value in state.items() if name.startswith("policy.")}
    loaded = load_policy(str(sft_runs["fsdp"] / "export")).state_dict()  # the export, back in module names
    assert loaded.keys() == sharded.keys()
    for name, value in loaded.items():
        torch.testing.assert_close(value, sharded[name], rtol=0, atol=0, msg=name)
    # Stopped at step 2 and resumed from the sharded checkpoint: the uninterrupted run's weights.
    assert_same_weights(exported(sft_runs["resumed"]), exported(sft_runs["fsdp"]), rtol=1e-5, atol=1e-6)
    config = json.loads((sft_runs["fsdp"] / "export" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_rl_and_opd_take_sharded_steps(tiny_model, demo_data, tmp_path):
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    teacher = build_tiny_qwen2_5_vl(tmp_path / "teacher", seed=1, hidden_size=192)
    for name, extra in (
        # A random policy earns no demo reward (no update); the length reward differs within every group.
        # With the other sharding options: HSDP (2 replicas of 1 shard), bf16 compute with fp32 reduction, activation
        # checkpointing; the frozen reference model sharded alike.
        (
            "rl.yaml",
            {
                "loss": {"kl_mode": "loss", "kl_coef": 0.01},
                "epochs": 2,
                "reward": "tests.test_rl.length_reward",
                "gradient_checkpointing": True,
                "fsdp": {"replicas": 2, "param_dtype": "bfloat16", "reduce_dtype": "float32"},
            },
        ),
        ("opd.yaml", {"teacher": {"model_name_or_path": str(teacher), "cache_dir": str(tmp_path / "cache")}}),
    ):
        run = tmp_path / name.removesuffix(".yaml")
        config = demo_config(name, tiny_model, demo_data, run, max_steps=2, limit_val_batches=0, devices=2)
        config["trainer"]["strategy"] = STRATEGY
        config["trainer"]["callbacks"] = []
        config["trainer"]["enable_checkpointing"] = False
        config["model"]["init_args"].update(extra)
        config["data"]["batch_size"] = 2
        config["export"] = {"weights": "last"}
        fit(config, tmp_path / name)
        after = exported(run)
        before = load_file(str(tiny_model / "model.safetensors"))
        assert any(not torch.equal(after[k], before[k]) for k in before), f"{name}: no weight moved"
        events = list((run / "lightning_logs").rglob("events.out.tfevents.*"))
        assert events, f"{name}: nothing logged"


def test_fsdp1_resumes_from_sharded_and_full_state_checkpoints(sft_runs):
    """FSDP1 (the 7B SFT recipe's FSDPStrategy) stopped at step 2 and resumed from its sharded last.ckpt to step 3:
    the uninterrupted run's weights. A full-state last.ckpt (one ordinary file, which Lightning's own loader
    cannot read from torch 2.14 on) restores the weights it holds, and the next stage's ``init_from`` reads it."""
    from vlm_post.models.init_from import policy_state_from_checkpoint
    from vlm_post.models.loading import load_policy

    assert (sft_runs["fsdp1_resumed"] / "checkpoints" / "last.ckpt").is_dir()
    assert_same_weights(exported(sft_runs["fsdp1_resumed"]), exported(sft_runs["fsdp1"]), rtol=1e-5, atol=1e-6)
    full = sft_runs["fsdp1_full"]
    assert (full / "checkpoints" / "last.ckpt").is_file()
    restored = load_file(str(full / "export_restored" / "model.safetensors"))
    assert_same_weights(restored, exported(full), rtol=0, atol=0)
    loaded = load_policy(str(full / "export")).state_dict()  # in module names
    assert_same_weights(policy_state_from_checkpoint(str(full / "checkpoints" / "last.ckpt")), loaded, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp1"])
def test_init_from_a_sharded_checkpoint_in_one_process(sft_runs, tiny_model, strategy):
    """The next stage (or an evaluation) on one process starts from a sharded checkpoint folder, FSDP2's or
    FSDP1's (they keep the weights under different keys): weights only."""
    from vlm_post.models.loading import load_policy
    from vlm_post.modules import SFTModule

    module = SFTModule(str(tiny_model), init_from=str(sft_runs[strategy] / "checkpoints" / "last.ckpt"))
    module.configure_model()
    expected = load_policy(str(sft_runs[strategy] / "export")).state_dict()
    for name, value in module.policy.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_sharded_evaluation_writes_what_one_process_writes(tiny_model, demo_data, tmp_path):
    """``vlm_post test`` on 2 processes: the same metrics, per-problem records (in the data set's order) and
    bootstrap intervals as one process, on 15 problems (8 + 7 and a filler)."""
    outputs = {}
    for label, extra in (("single", {}), ("fsdp", {"devices": 2, "strategy": STRATEGY})):
        config = yaml.safe_load((ROOT / "configs/demo/eval.yaml").read_text())
        config["model"]["init_args"]["model_name_or_path"] = str(tiny_model)
        outputs[label] = tmp_path / label
        config["model"]["init_args"]["eval"].update(n=4, top_k=1, output_dir=str(outputs[label]))
        config["data"]["test"] = [{"name": "demo_test", "path": str(demo_data / "test.parquet"), "limit": 15}]
        config["data"]["eval_batch_size"] = 4
        config["trainer"].update(default_root_dir=str(tmp_path / f"run_{label}"), **extra)
        (tmp_path / f"{label}.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [VLM_POST, "test", "--config", str(tmp_path / f"{label}.yaml")]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    single, sharded = ((outputs[k] / "demo_test.jsonl").read_text().splitlines() for k in ("single", "fsdp"))
    assert len(single) == 15 and [json.loads(r)["id"] for r in sharded] == [json.loads(r)["id"] for r in single]
    for ours, theirs in zip(sharded, single):
        ours, theirs = json.loads(ours), json.loads(theirs)
        assert ours.pop("mean_token_entropy") == pytest.approx(theirs.pop("mean_token_entropy"), rel=1e-5)
        assert ours == theirs
    summaries = [json.loads((outputs[k] / "summary.json").read_text())["results"][0] for k in ("single", "fsdp")]
    assert summaries[0].keys() == summaries[1].keys() and summaries[0]["problems"] == summaries[1]["problems"] == 15
    for key, value in summaries[0].items():
        assert summaries[1][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


def test_ranks_that_keep_different_rows_take_the_same_steps(tiny_model, demo_data, tmp_path):
    """Dynamic sampling keeps rank 0's rows and drops all of rank 1's: rank 1 must still join every forward and
    backward (FSDP's collectives) with passes of zero weight, or the run hangs; the update is rank 0's rows'."""
    run = tmp_path / "rl"
    config = demo_config("rl.yaml", tiny_model, demo_data, run, max_steps=2, limit_val_batches=0, devices=2)
    config["trainer"].update(strategy=STRATEGY, callbacks=[], enable_checkpointing=False)
    config["model"]["init_args"].update(
        reward="tests.test_distributed.rank_zero_length_reward",
        dynamic_sampling=True,
        micro_batch_size=4,
        mini_batch_size=1,
    )
    config["data"]["batch_size"] = 2
    config["export"] = {"weights": "last"}
    fit(config, tmp_path / "rl.yaml", timeout=300)
    before = load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(exported(run)[k], before[k]) for k in before), "no weight moved"


def test_a_rank_with_every_score_cached_joins_the_other_ranks_teacher_passes(tiny_model, demo_data, tmp_path):
    """OPD's sharded teacher forwards are collectives. A run repeated with rank 1's cached scores removed finds all of
    rank 0's rows in the cache and none of rank 1's: rank 0 must join rank 1's teacher passes with passes of its own,
    or the run hangs. The scores it reads equal those it would compute, so both runs end on the same weights."""
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    teacher = build_tiny_qwen2_5_vl(tmp_path / "teacher", seed=1, hidden_size=192)
    cache = tmp_path / "cache"
    weights = {}
    for label in ("scored", "half_cached"):
        run = tmp_path / label
        config = demo_config("opd.yaml", tiny_model, demo_data, run, max_steps=2, limit_val_batches=0, devices=2)
        config["trainer"].update(strategy=STRATEGY, callbacks=[], enable_checkpointing=False)
        config["model"]["init_args"]["teacher"].update(model_name_or_path=str(teacher), cache_dir=str(cache))
        config["data"]["batch_size"] = 2
        config["export"] = {"weights": "last"}
        fit(config, tmp_path / f"{label}.yaml", timeout=300)
        weights[label] = exported(run)
        if label == "scored":
            rank1 = json.loads((cache / "manifest-rank1.json").read_text())
            assert rank1["shards"], "rank 1 wrote no scores"
            (cache / "manifest-rank1.json").unlink()  # its shards, listed nowhere, are ignored
            rank0_shards = json.loads((cache / "manifest-rank0.json").read_text())["shards"]
    # Rank 0 scored nothing the second time (its manifest is unchanged); rank 1 scored its rows again.
    assert json.loads((cache / "manifest-rank0.json").read_text())["shards"] == rank0_shards
    assert json.loads((cache / "manifest-rank1.json").read_text())["shards"]
    assert_same_weights(weights["scored"], weights["half_cached"], rtol=0, atol=0)


def test_rl_under_fsdp1_is_refused_in_one_line(tiny_model, demo_data, tmp_path):
    """RL steps its optimizer inside training_step, which FSDP1's root forward cannot host: a clear refusal."""
    config = demo_config("rl.yaml", tiny_model, demo_data, tmp_path / "rl", max_steps=1, devices=2)
    config["trainer"]["strategy"] = fsdp1_strategy()
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [VLM_POST, "fit", "--config", str(tmp_path / "rl.yaml")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert "vlm_post: error: RLModule cannot train under trainer.strategy FSDPStrategy (FSDP1)" in result.stderr
