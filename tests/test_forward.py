"""The policy forward over n rows per prompt encodes each distinct image once, with unchanged values and gradients."""

from __future__ import annotations

import pytest
import torch

from tests.test_rollout import _batch
from vlm_post.models.forward import IMAGE_SOURCE, decoder_hidden_states
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
    inputs = samples.rows([0, 2, 3, 5]).forward_inputs()
    assert inputs[IMAGE_SOURCE].tolist() == [0, 0, 1, 2, 1, 2]  # rows 0, 2 show image 0; rows 3, 5 images 1, 2

    patches = []
    handle = policy.model.visual.register_forward_pre_hook(lambda module, args: patches.append(args[0].shape[0]))
    results = []
    try:
        for shared in (True, False):
            policy.zero_grad()
            rows = inputs if shared else {k: v for k, v in inputs.items() if k != IMAGE_SOURCE}
            hidden = decoder_hidden_states(policy, rows)
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
    inputs = samples.rows([1, 2, 3, 4, 5]).forward_inputs()
    width, mask = batch["prompt"]["input_ids"].shape[1], samples.response_mask[[1, 2, 3, 4, 5]].bool()
    assert forward.prompt_groups(policy, inputs, width)[0] == [0, 2]
    results = []
    for shared in (True, False):
        policy.zero_grad()
        groups = forward.prompt_groups
        if not shared:
            forward.prompt_groups = lambda model, inputs, width: None
        try:
            hidden = forward.response_hidden_states(policy, inputs, width, mask.shape[1])
        finally:
            forward.prompt_groups = groups
        targets = inputs["input_ids"][:, width : width + mask.shape[1]][mask]
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
