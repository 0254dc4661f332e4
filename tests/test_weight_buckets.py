"""The policy's weights in buckets of full tensors, as the vLLM sync streams them: every weight once, in order,
equal to the model's own, unsharded and under FSDP2 (two gloo processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vlm_post.models.loading import load_policy
from vlm_post.models.sharding import FSDPConfig, full_weight_buckets, shard_model, weight_unit


@pytest.mark.fast
def test_buckets_hold_every_weight_once_within_the_size(tiny_model):
    policy = load_policy(str(tiny_model))
    state = policy.state_dict()
    bucket_mb = 0.05
    buckets = list(full_weight_buckets(policy, bucket_mb))
    assert len(buckets) > 3
    assert [name for bucket in buckets for name, _ in bucket] == list(state)
    units = [{weight_unit(name) for name, _ in bucket} for bucket in buckets]
    for bucket, unit in zip(buckets, units):
        size = sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
        assert size <= bucket_mb * 2**20 or len(unit) == 1, size  # over the size: one block alone
        for name, tensor in bucket:
            assert torch.equal(tensor, state[name]), name
    for i, unit in enumerate(units):  # a block is never split: vLLM fuses q, k, v (and gate, up) of one block
        assert not unit & set().union(*units[:i], *units[i + 1 :]), unit
    assert weight_unit("model.language_model.layers.3.self_attn.q_proj.weight") == "model.language_model.layers.3"
    assert weight_unit("model.language_model.norm.weight") == "model.language_model.norm"
    assert len(list(full_weight_buckets(policy, 1e4))) == 1


def _sharded_buckets(rank: int, model: str, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        policy = load_policy(model)
        expected = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
        shard_model(policy, init_device_mesh("cpu", (2,)), FSDPConfig())
        got = [(name, tensor.clone()) for bucket in full_weight_buckets(policy, 0.05) for name, tensor in bucket]
        assert [name for name, _ in got] == list(expected)
        for name, tensor in got:
            assert torch.equal(tensor, expected[name]), f"rank {rank}: {name}"
        Path(f"{out}.{rank}").write_text(str(len(got)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sharded_buckets_gather_the_full_weights(tiny_model, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(
        _sharded_buckets, args=(str(tiny_model), str(tmp_path / "store"), str(tmp_path / "done")), nprocs=2
    )
    counts = {(tmp_path / f"done.{rank}").read_text() for rank in range(2)}
    assert len(counts) == 1 and int(counts.pop()) == len(load_policy(str(tiny_model)).state_dict())
