"""HFTeacher.score: rows that share a prompt run it once (models.forward) and score as the full forward does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlm_post.data import DataSource
from vlm_post.data.collate import Collator
from vlm_post.data.datamodule import ExampleDataset
from vlm_post.models import forward
from vlm_post.models.forward import prompt_groups
from vlm_post.rollout.base import Rollouts
from vlm_post.rollout.sequences import policy_inputs, select_rows
from vlm_post.teacher.scoring import HFTeacher


@pytest.fixture(scope="module")
def teacher(tiny_model, processor):
    return HFTeacher(str(tiny_model), processor, top_k=8).load("cpu")


def examples(demo_data, count: int):
    dataset = ExampleDataset(DataSource("demo_train", path=str(demo_data / "train.parquet")), 12544, 12544)
    return [dataset[i] for i in range(count)]


def full_forward_scores(teacher: HFTeacher, inputs: dict, width: int, mask: torch.Tensor) -> dict:
    plain = forward.prompt_groups
    forward.prompt_groups = lambda model, inputs, width: None
    try:
        return teacher.score(inputs, width, mask)
    finally:
        forward.prompt_groups = plain


def test_rows_sharing_a_prompt_score_as_the_full_forward(teacher, processor, demo_data):
    first, second, third = examples(demo_data, 3)
    batch = Collator(processor)(
        [
            first,
            dataclasses.replace(second, question="<image>Which bar is longer?"),  # shorter: left-padded
            dataclasses.replace(third, images=third.images + first.images, question="<image> or <image>: which bar?"),
        ]
    )
    prompt, counts, n, length = batch["prompt"], batch["image_counts"], 3, 7
    assert not bool(prompt["attention_mask"][:, 0].all())
    lengths = torch.tensor([7, 3, 1, 7, 5, 2, 6, 7, 4])  # finished responses are right-padded
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    response = torch.randint(20, 250, (9, length), generator=torch.Generator().manual_seed(0))
    rollouts = Rollouts(torch.arange(3).repeat_interleave(n), response, mask, lengths < length, [""] * 9)
    inputs, width = policy_inputs(prompt, counts, rollouts, n), prompt["input_ids"].shape[1]
    # all rows, then a micro-batch that cuts the first prompt's rows
    for rows, leaders in ([list(range(9)), [0, 3, 6]], [[2, 3, 4, 5, 6, 7, 8], [0, 1, 4]]):
        micro = select_rows(inputs, rows, n, counts)
        assert prompt_groups(teacher.model, micro, width)[0] == leaders
        shared, full = teacher.score(micro, width, mask[rows]), full_forward_scores(teacher, micro, width, mask[rows])
        assert torch.equal(shared["topk_ids"], full["topk_ids"])
        for key in ("topk_logprobs", "sampled_logprobs"):
            assert torch.allclose(shared[key], full[key], atol=1e-5), key


def test_text_only_prompts_are_shared_too(teacher, processor, demo_data):
    first, second = (dataclasses.replace(e, images=[]) for e in examples(demo_data, 2))
    second = dataclasses.replace(second, question="Which bar is longer, the red one?")
    batch = Collator(processor)([first, second])
    n, length = 2, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    response = torch.randint(20, 250, (4, length), generator=torch.Generator().manual_seed(1))
    rollouts = Rollouts(torch.arange(2).repeat_interleave(n), response, mask, mask[:, -1] == 0, [""] * 4)
    inputs = policy_inputs(batch["prompt"], batch["image_counts"], rollouts, n)
    width = batch["prompt"]["input_ids"].shape[1]
    assert prompt_groups(teacher.model, inputs, width)[0] == [0, 2]
    shared, full = teacher.score(inputs, width, mask), full_forward_scores(teacher, inputs, width, mask)
    assert torch.equal(shared["topk_ids"], full["topk_ids"])
    assert torch.allclose(shared["topk_logprobs"], full["topk_logprobs"], atol=1e-5)


def test_prompts_with_the_same_text_and_other_images_are_not_shared(teacher, processor, demo_data):
    batch = Collator(processor)(examples(demo_data, 4))
    assert len(set(Collator(processor).prompt_texts(batch["examples"]))) == 1
    assert prompt_groups(teacher.model, batch["prompt"], batch["prompt"]["input_ids"].shape[1]) is None


def test_topk_logprobs_equal_the_full_log_softmax():
    """Chunked (3 tokens a chunk) with the normaliser taken in place: the full log-softmax's top-k and targets."""
    from vlm_post.teacher.scoring import topk_logprobs

    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (10,))
    ids, values, sampled = topk_logprobs(hidden, weight, targets, k=5, chunk_size=3)
    full = torch.log_softmax(hidden @ weight.t(), dim=-1)
    top = full.topk(5, dim=-1)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), top.indices)
    torch.testing.assert_close(values, top.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled, full.gather(-1, targets[:, None]).squeeze(-1), rtol=1e-5, atol=1e-5)
