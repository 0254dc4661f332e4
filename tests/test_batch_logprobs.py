"""batch_logprobs, the one way from model rows to log-probs (policy, reference, teacher), against the full
forward's full-vocabulary log-softmax, values and gradients, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from tests.test_rollout import _batch
from vlm_post.models.forward import shares_prompts
from vlm_post.models.loading import load_policy
from vlm_post.models.logprobs import batch_logprobs
from vlm_post.rollout import ModelRows, RolloutBatch

pytestmark = pytest.mark.fast

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def policy(tiny_model):
    return load_policy(str(tiny_model)).train()


@pytest.fixture(scope="module")
def rows(policy, processor) -> ModelRows:
    batch, n, length = _batch(processor), 3, 6  # 2 prompts with 1 and 2 images
    lengths = torch.tensor([6, 3, 1, 6, 4, 2])  # finished responses are right-padded
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    response = torch.randint(20, 250, (2 * n, length), generator=torch.Generator().manual_seed(0))
    samples = RolloutBatch(batch["prompt"], batch["image_counts"], n, response, mask, lengths < length, [""] * 6)
    rows = samples.rows([1, 2, 3, 4, 5])  # cuts the first prompt's rows; the second's share a prompt
    assert rows.leaders == [0, 2] and shares_prompts(policy, rows.inputs, rows)  # the shared-prompt forward runs
    return rows


def full_log_softmax(model: torch.nn.Module, rows: ModelRows, temperature: float) -> torch.Tensor:
    """[R, L, V]: the full forward's log-softmax at the positions that predict each response token."""
    width, length = rows.prompt_width, rows.response_mask.shape[1]
    logits = model(**rows.inputs, use_cache=False).logits[:, width - 1 : width - 1 + length]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def gradients(model: torch.nn.Module, value: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    value.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def weighted(values: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A loss that weighs each response position differently, so every position's gradient counts."""
    weights = torch.rand(values.shape, generator=torch.Generator().manual_seed(seed))
    return (values * weights * mask.reshape(*mask.shape, *[1] * (values.dim() - 2))).sum()


def assert_gradients_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and any("visual" in name for name in want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_sampled_logprobs_and_entropy_equal_the_full_log_softmax(policy, rows):
    mask = rows.response_mask.bool()
    scores = batch_logprobs(policy, rows, temperature=TEMPERATURE, with_entropy=True, chunk_size=4)
    got = gradients(policy, weighted(scores.logprobs, mask, 0) + weighted(scores.entropy, mask, 1))

    logp = full_log_softmax(policy, rows, TEMPERATURE)
    sampled = logp.gather(-1, rows.response_ids[..., None]).squeeze(-1) * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    want = gradients(policy, weighted(sampled, mask, 0) + weighted(entropy, mask, 1))

    assert scores.logprobs.shape == scores.entropy.shape == mask.shape
    assert bool((scores.logprobs[~mask] == 0).all()) and bool((scores.entropy[~mask] == 0).all())
    torch.testing.assert_close(scores.logprobs.detach(), sampled.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.entropy.detach(), entropy.detach(), rtol=1e-5, atol=1e-5)
    assert_gradients_close(got, want)
    assert scores.topk_ids is None and scores.topk_logprobs is None


def test_logprobs_of_given_ids_equal_the_full_log_softmax_at_them(policy, rows):
    mask = rows.response_mask.bool()
    ids = torch.randint(0, policy.config.get_text_config().vocab_size, (*mask.shape, 5))
    scores = batch_logprobs(policy, rows, ids=ids, temperature=TEMPERATURE)
    got = gradients(policy, weighted(scores.logprobs, mask, 2))
    at_ids = full_log_softmax(policy, rows, TEMPERATURE).gather(-1, ids) * mask[..., None]
    want = gradients(policy, weighted(at_ids, mask, 2))
    assert scores.logprobs.shape == ids.shape and scores.entropy is None
    torch.testing.assert_close(scores.logprobs.detach(), at_ids.detach(), rtol=1e-5, atol=1e-5)
    assert_gradients_close(got, want)


def test_the_models_own_top_k_equals_the_full_log_softmax(policy, rows):
    mask = rows.response_mask.bool()
    with torch.no_grad():
        scores = batch_logprobs(policy, rows, top_k=8, chunk_size=3)
        top = full_log_softmax(policy, rows, 1.0).topk(8, dim=-1)
    assert scores.topk_ids.dtype == torch.int32 and scores.topk_ids.shape == (*mask.shape, 8)
    assert torch.equal(scores.topk_ids[mask].long(), top.indices[mask])
    torch.testing.assert_close(scores.topk_logprobs[mask], top.values[mask], rtol=1e-5, atol=1e-5)
    assert bool((scores.topk_logprobs[~mask] == 0).all()) and bool((scores.topk_ids[~mask] == 0).all())
