"""RolloutBatch: rows of any subset give each row's own prompt + response, as a forward of that row alone sees it."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import examples_with_0_1_2_images
from vlm_post.data.collate import Collator
from vlm_post.data.schema import Example
from vlm_post.models.loading import load_policy
from vlm_post.rollout import HFGenerateEngine, RolloutBatch, SamplingParams

pytestmark = pytest.mark.fast


def _examples() -> list[Example]:
    """Prompts with 2, 0 and 1 images, so image offsets differ from prompt to prompt."""
    text, one, two = examples_with_0_1_2_images()
    return [two, text, one]


def _batch(processor, n: int, seed: int = 0) -> tuple[dict, RolloutBatch]:
    """The collated prompts and a RolloutBatch of random responses (ragged, some cut by the stop token)."""
    collated = Collator(processor)(_examples())
    engine = HFGenerateEngine(processor)
    generator = torch.Generator().manual_seed(seed)
    rows, length = 3 * n, 7
    allowed = torch.tensor([t for t in range(256) if t not in engine.banned])
    response = allowed[torch.randint(len(allowed), (rows, length), generator=generator)]
    cut = torch.randint(1, length + 1, (rows,), generator=generator)
    for row in range(rows):
        if cut[row] < length:
            response[row, cut[row] - 1] = engine.stop_ids[0]
    rollouts = engine.rollouts(3, response, n, None)
    return collated, RolloutBatch.from_rollouts(collated["prompt"], collated["image_counts"], rollouts, n)


def _alone(processor, policy, example: Example, response: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``response`` (its real tokens) after ``example``'s prompt, in a batch of that row alone."""
    prompt = Collator(processor)([example])["prompt"]
    inputs = dict(prompt)
    width = prompt["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([prompt["input_ids"], response[None]], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in prompt:
        zeros = prompt["mm_token_type_ids"].new_zeros(1, len(response))
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], zeros], dim=1)
    with torch.no_grad():
        logits = policy(**inputs).logits[0, width - 1 : width - 1 + len(response)].float()
    return logits.log_softmax(-1).gather(-1, response[:, None])[:, 0]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_rows_of_a_subset_give_each_rows_own_logprobs(tiny_model, processor, n):
    torch.manual_seed(0)
    policy = load_policy(str(tiny_model)).eval()
    _, batch = _batch(processor, n)
    # every row, and a subset that splits prompt 0's group and prompt 2's, out of order between groups
    subsets = [None, [r for r in range(batch.num_rows) if r % 2 == 0] + [batch.num_rows - 1]]
    for subset in subsets:
        rows = batch.rows(subset)
        wanted = list(range(batch.num_rows)) if subset is None else subset
        with torch.no_grad():
            logits = policy(**rows.inputs).logits.float()
        width = rows.prompt_width
        for position, row in enumerate(wanted):
            real = int(batch.response_mask[row].sum())
            response = batch.response_ids[row, :real]
            ours = logits[position, width - 1 : width - 1 + real].log_softmax(-1).gather(-1, response[:, None])[:, 0]
            expected = _alone(processor, policy, _examples()[row // n], response)
            assert torch.allclose(ours, expected, atol=1e-5), (n, subset, row, (ours - expected).abs().max())
            assert torch.equal(rows.response_mask[position], batch.response_mask[row])


def test_rows_state_the_structure_a_forward_may_share(processor):
    _, batch = _batch(processor, n=3)  # prompts with 2, 0 and 1 images; rows 0-2, 3-5, 6-8
    rows = batch.rows([1, 2, 4, 6, 7])
    assert rows.leaders == [0, 2, 3] and rows.group.tolist() == [0, 0, 1, 2, 2]
    assert rows.image_source.tolist() == [0, 1, 0, 1, 2, 2]  # rows 1 and 2 copy images 0 and 1; 6 and 7 image 2
    assert rows.inputs["image_grid_thw"].shape[0] == 6
    assert rows.inputs["pixel_values"].shape[0] == int(rows.inputs["image_grid_thw"].prod(-1).sum())


def test_the_engine_builds_the_batch_once(tiny_model, processor):
    torch.manual_seed(0)
    policy = load_policy(str(tiny_model)).eval()
    collated = Collator(processor)(_examples())
    batch = HFGenerateEngine(processor).sample(policy, collated, SamplingParams(n=2, max_new_tokens=4), logprobs=True)
    assert batch.n == 2 and batch.image_counts == [2, 0, 1] and batch.prompt is collated["prompt"]
    assert batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2] and batch.sampler_logprobs.shape == (6, 4)


def test_a_batch_that_does_not_add_up_is_refused(processor):
    collated, batch = _batch(processor, n=2)
    with pytest.raises(ValueError, match="responses for 3 prompts"):
        RolloutBatch(collated["prompt"], [2, 0, 1], 3, batch.response_ids, batch.response_mask, batch.finished, [])
    with pytest.raises(ValueError, match="image counts sum to 2"):
        RolloutBatch(collated["prompt"], [1, 0, 1], 2, batch.response_ids, batch.response_mask, batch.finished, [])
