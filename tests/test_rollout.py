"""Sampling through the HF engine, and prompt+response batches that reproduce the sampler's view."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_post.data.collate import Collator
from vlm_post.data.schema import Example
from vlm_post.models.loading import load_policy
from vlm_post.rollout import HFGenerateEngine, RolloutBatch, SamplingParams

pytestmark = pytest.mark.fast


def _batch(processor):
    examples = [
        Example(
            id="a", images=[Image.new("RGB", (112, 112), "red")], question="<image>Which bar?", answer="red", source="s"
        ),
        Example(
            id="b",
            images=[Image.new("RGB", (56, 56), "blue"), Image.new("RGB", (84, 56), "white")],
            question="<image> and <image>: which is longer, the red one or the blue one?",
            answer="blue",
            source="s",
        ),
    ]
    return Collator(processor)(examples)


def test_rows_repeat_each_prompts_pixels_per_row(processor):
    batch = _batch(processor)
    prompt, n = batch["prompt"], 3
    response = torch.ones(2 * n, 1, dtype=torch.long)
    repeated = (
        RolloutBatch(prompt, batch["image_counts"], n, response, response, response[:, 0].bool(), []).rows().inputs
    )
    assert repeated["input_ids"].shape[0] == 6
    patches = prompt["image_grid_thw"].prod(-1).tolist()  # [64, 16, 24]: one image, then two
    first, second = prompt["pixel_values"][: patches[0]], prompt["pixel_values"][patches[0] :]
    expected = torch.cat([first] * 3 + [second] * 3)
    assert torch.equal(repeated["pixel_values"], expected)
    assert repeated["image_grid_thw"].shape[0] == 9


def test_prompt_plus_response_forward_reproduces_the_sampler_logits(tiny_model, processor):
    """Positions, mrope (via mm_token_type_ids), image rows: any slip changes the re-scored logits."""
    torch.manual_seed(0)
    policy = load_policy(str(tiny_model)).eval()
    batch = _batch(processor)
    engine, n = HFGenerateEngine(processor), 2
    rollouts = engine.generate(policy, batch["prompt"], SamplingParams(n=n, temperature=0.0, max_new_tokens=10))
    assert rollouts.response_ids.shape[0] == 4 and rollouts.prompt_index.tolist() == [0, 0, 1, 1]
    with torch.no_grad():
        steps = policy.generate(
            **batch["prompt"], do_sample=False, max_new_tokens=10, output_logits=True, return_dict_in_generate=True,
            eos_token_id=engine.stop_ids, pad_token_id=engine.pad_token_id, suppress_tokens=engine.banned,
        ).logits  # fmt: skip
        sampler_logits = torch.stack(steps, dim=1).repeat_interleave(n, dim=0)  # (B*n, L, V)
        inputs = RolloutBatch.from_rollouts(batch["prompt"], batch["image_counts"], rollouts, n).rows().inputs
        logits = policy(**inputs).logits
    width, length = batch["prompt"]["input_ids"].shape[1], rollouts.response_ids.shape[1]
    rescored = logits[:, width - 1 : width - 1 + length]
    mask = rollouts.response_mask.bool()
    assert torch.equal(rescored.argmax(-1)[mask], rollouts.response_ids[mask])
    banned = torch.tensor(engine.banned)
    rescored[..., banned] = sampler_logits[..., banned]  # suppressed tokens are -inf in the sampler's view
    torch.testing.assert_close(rescored[mask], sampler_logits[:, :length][mask], atol=1e-4, rtol=1e-4)


def test_sampling_never_emits_vision_tokens(tiny_model, processor):
    torch.manual_seed(0)
    policy = load_policy(str(tiny_model))
    engine = HFGenerateEngine(processor)
    rollouts = engine.generate(
        policy, _batch(processor)["prompt"], SamplingParams(n=8, temperature=1.5, max_new_tokens=24)
    )
    assert not torch.isin(rollouts.response_ids, torch.tensor(engine.banned)).any()
    assert policy.training, "the engine must restore train mode"


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_vision_encoder_runs_once_per_prompt_not_per_sample(arch, tiny_model, processor, tmp_path):
    """transformers >= 5 encodes images before expanding to n samples; a regression would cost n x vision time."""
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    path = tiny_model if arch == "qwen2_5_vl" else build_tiny_qwen2_5_vl(tmp_path / arch, arch=arch)
    policy = load_policy(str(path))
    batch = _batch(processor)
    images_per_call = []

    def count(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        images_per_call.append(grid.shape[0])

    handle = policy.model.visual.register_forward_pre_hook(count, with_kwargs=True)
    try:
        rollouts = HFGenerateEngine(processor).generate(
            policy, batch["prompt"], SamplingParams(n=4, temperature=1.0, max_new_tokens=6)
        )
    finally:
        handle.remove()
    assert rollouts.response_ids.shape[0] == 8
    assert images_per_call == [3], images_per_call  # one call over the 3 images of 2 prompts, for 8 samples


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_shared_prefill_samples_what_plain_generate_samples(arch, tiny_model, processor, tmp_path, monkeypatch):
    """Prefilling each prompt once and repeating its cache n times changes nothing but the cost: same seed,
    same tokens, on prompts of different lengths (left padding) with one and two images."""
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    path = tiny_model if arch == "qwen2_5_vl" else build_tiny_qwen2_5_vl(tmp_path / arch, arch=arch)
    policy = load_policy(str(path))
    batch = _batch(processor)
    engine, params = HFGenerateEngine(processor), SamplingParams(n=4, temperature=1.0, max_new_tokens=12)
    assert engine._can_share_prefill(policy, batch["prompt"])
    prefills = []
    handle = policy.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True
    )
    try:
        torch.manual_seed(0)
        shared = engine.generate(policy, batch["prompt"], params)
    finally:
        handle.remove()
    width = batch["prompt"]["input_ids"].shape[1]
    assert prefills[0] == (2, width - 1) and prefills[1] == (8, 1), prefills[:2]  # 2 prompts prefilled, not 8 rows
    monkeypatch.setattr(HFGenerateEngine, "_can_share_prefill", staticmethod(lambda policy, prompt: False))
    torch.manual_seed(0)
    plain = engine.generate(policy, batch["prompt"], params)
    assert torch.equal(shared.response_ids, plain.response_ids)
    assert torch.equal(shared.response_mask, plain.response_mask)
    assert shared.texts == plain.texts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_policy_forward(temperature, tiny_model, processor):
    """The engine's own log-probs of the drawn tokens (top_p 1, top_k 0) are the policy's at the sampling
    temperature, recomputed by a training forward (over the vocabulary the sampler may draw from); padding
    gets 0. The shared-prefill path is covered (n > 1)."""
    from vlm_post.losses import token_logprobs
    from vlm_post.models.forward import decoder_hidden_states

    policy = load_policy(str(tiny_model))
    batch = _batch(processor)
    torch.manual_seed(0)
    samples = HFGenerateEngine(processor).generate(
        policy, batch["prompt"], SamplingParams(n=4, temperature=temperature, max_new_tokens=10), logprobs=True
    )
    assert samples.logprobs is not None and samples.logprobs.shape == samples.response_ids.shape
    policy.eval()
    rows = RolloutBatch.from_rollouts(batch["prompt"], batch["image_counts"], samples, 4).rows()
    inputs = rows.inputs
    width, mask = batch["prompt"]["input_ids"].shape[1], samples.response_mask.bool()
    with torch.no_grad():
        hidden = decoder_hidden_states(policy, inputs, rows.image_source)
    predicting = hidden[:, width - 1 : width - 1 + mask.shape[1]][mask]
    targets = inputs["input_ids"][:, width : width + mask.shape[1]][mask]
    logits = (predicting @ policy.get_output_embeddings().weight.t()) / temperature
    engine = HFGenerateEngine(processor)
    full = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(full, token_logprobs(predicting, policy.get_output_embeddings().weight, targets,
                                                    temperature=temperature))  # fmt: skip
    # The sampler never draws the suppressed vision tokens: its distribution is the policy's renormalised without them.
    logits[:, engine.banned] = float("-inf")
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(samples.logprobs[mask], expected, rtol=1e-4, atol=1e-4)
    assert (samples.logprobs[~mask] == 0).all() and (samples.logprobs[mask] < 0).all()


def test_sampler_ignores_a_checkpoints_generation_settings(tiny_model, processor, tmp_path):
    """A generation_config.json with Qwen-Instruct-like settings (repetition penalty, top_k 1) must not change what
    the engine samples: RL scores the samples under the plain policy."""
    import shutil

    from transformers import GenerationConfig

    path = tmp_path / "instruct-like"
    shutil.copytree(tiny_model, path)
    config = GenerationConfig.from_pretrained(path)
    config.update(do_sample=True, repetition_penalty=1.3, top_k=1, top_p=0.001, temperature=0.01)
    config.save_pretrained(path)
    batch, params = _batch(processor), SamplingParams(n=3, temperature=1.0, max_new_tokens=10)
    outputs = []
    for model_path in (tiny_model, path):
        torch.manual_seed(0)
        outputs.append(HFGenerateEngine(processor).generate(load_policy(str(model_path)), batch["prompt"], params))
    assert torch.equal(outputs[0].response_ids, outputs[1].response_ids)


def test_logprob_recorder_is_opt_in_and_changes_no_sample(tiny_model, processor):
    policy, batch = load_policy(str(tiny_model)), _batch(processor)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8)
    outputs = []
    for logprobs in (False, True):
        torch.manual_seed(0)
        outputs.append(HFGenerateEngine(processor).generate(policy, batch["prompt"], params, logprobs=logprobs))
    assert outputs[0].logprobs is None and outputs[1].logprobs is not None
    assert torch.equal(outputs[0].response_ids, outputs[1].response_ids)
