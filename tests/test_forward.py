"""The policy forward over n rows per prompt encodes each distinct image once, with unchanged values and gradients."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import unshared_prompts
from tests.test_rollout import _batch
from vlm_post.models.forward import decoder_hidden_states
from vlm_post.models.loading import load_policy
from vlm_post.rollout import HFGenerateEngine, SamplingParams

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_each_image_is_encoded_once_with_the_same_values_and_gradients(arch, tiny_model, processor, tmp_path):
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    path = tiny_model if arch == "qwen2_5_vl" else build_tiny_qwen2_5_vl(tmp_path / arch, arch=arch)
    policy = load_policy(str(path))
    batch = _batch(processor)  # 2 prompts with 1 and 2 images
    n = 3
    torch.manual_seed(0)
    samples = HFGenerateEngine(processor).sample(policy, batch, SamplingParams(n=n, max_new_tokens=6))
    rows = samples.rows([0, 2, 3, 5])
    assert rows.image_source.tolist() == [0, 0, 1, 2, 1, 2]  # rows 0, 2 show image 0; rows 3, 5 images 1, 2

    patches = []
    handle = policy.model.visual.register_forward_pre_hook(lambda module, args: patches.append(args[0].shape[0]))
    results = []
    try:
        for shared in (True, False):
            policy.zero_grad()
            hidden = decoder_hidden_states(policy, rows.inputs, rows.image_source if shared else None)
            (hidden.square().mean()).backward()
            grads = {name: p.grad.clone() for name, p in policy.model.visual.named_parameters() if p.grad is not None}
            results.append((hidden.detach(), grads))
    finally:
        handle.remove()
    grid_patches = batch["prompt"]["image_grid_thw"].prod(-1).sum().item()  # the 3 distinct images
    assert patches == [grid_patches, 2 * grid_patches]  # shared: each image once; repeated: every copy
    (shared_hidden, shared_grads), (plain_hidden, plain_grads) = results
    torch.testing.assert_close(shared_hidden, plain_hidden, rtol=1e-5, atol=1e-5)
    assert shared_grads.keys() == plain_grads.keys() and shared_grads
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_rows_sharing_a_prompt_run_it_once_with_the_same_values_and_gradients(arch, tiny_model, processor, tmp_path):
    """The update's forward runs each distinct prompt once and repeats its KV cache over the n rows; log-probs and
    every parameter's gradient equal the full forward over all rows (here with a micro-batch that cuts a group)."""
    from vlm_post.losses import token_logprobs
    from vlm_post.models import forward
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    path = tiny_model if arch == "qwen2_5_vl" else build_tiny_qwen2_5_vl(tmp_path / arch, arch=arch)
    policy = load_policy(str(path))  # train mode, as in the update
    batch, n = _batch(processor), 3
    torch.manual_seed(0)
    samples = HFGenerateEngine(processor).sample(policy, batch, SamplingParams(n=n, max_new_tokens=6))
    rows = samples.rows([1, 2, 3, 4, 5])
    mask = rows.response_mask.bool()
    assert rows.leaders == [0, 2] and forward.shares_prompts(policy, rows.inputs, rows)
    assert not forward.shares_prompts(policy, rows.inputs, unshared_prompts(rows))
    results = []
    for shared in (True, False):
        policy.zero_grad()
        hidden = forward.response_hidden_states(policy, rows if shared else unshared_prompts(rows))
        targets = rows.response_ids[mask]
        logprobs = token_logprobs(hidden[mask], policy.get_output_embeddings().weight, targets)
        logprobs.sum().backward()
        results.append(
            (logprobs.detach(), {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None})
        )
    (shared_lp, shared_grads), (full_lp, full_grads) = results
    torch.testing.assert_close(shared_lp, full_lp, rtol=1e-5, atol=1e-5)
    assert shared_grads.keys() == full_grads.keys() and any("visual" in k for k in full_grads)
    for name in full_grads:
        torch.testing.assert_close(shared_grads[name], full_grads[name], rtol=1e-4, atol=1e-5, msg=name)
