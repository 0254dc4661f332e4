"""The naive baseline of bench/memory.py: vlm_post's modules with the full-logits head a straightforward version has.

Each class changes only where log-probs, entropies and top-k scores come from: the model's own forward
(``model(**inputs).logits``, [rows, T, V] in fp32, every position of every row, each row with its own copy
of its prompt and image), then ``log_softmax`` over the whole vocabulary and a gather (entropy, a logged
metric, from the same log-softmax under no_grad; the teacher's top-k from the same log-softmax). Sampling,
rewards, losses, clipping, the optimizer and the Lightning loop are the modules' own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import vlm_post.modules.distill
import vlm_post.modules.on_policy
import vlm_post.modules.rl
from vlm_post.losses.sft import IGNORE_INDEX
from vlm_post.models.logprobs import ResponseScores
from vlm_post.modules import DistillModule, RLModule, SFTModule
from vlm_post.rollout import ModelRows
from vlm_post.teacher import HFTeacher, TeacherBatch


def full_logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """[rows, T, V]: the model's logits at every position (the vision encoder runs on every image copy)."""
    inputs = {key: value for key, value in inputs.items() if key != "labels"}
    return model(**inputs, use_cache=False).logits.float()


def response_logits(model: torch.nn.Module, rows: ModelRows) -> torch.Tensor:
    """[rows, length, V]: the logits that predict the response tokens (a view of the full logits)."""
    width, length = rows.prompt_width, rows.response_mask.shape[1]
    return full_logits(model, rows.inputs)[:, width - 1 : width - 1 + length]


def full_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)


def entropy_metric(logprobs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return -(logprobs.exp() * logprobs).sum(-1)


class NaiveSFT(SFTModule):
    def sft_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        logprobs = torch.log_softmax(full_logits(self.policy, batch)[:, :-1], dim=-1)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        count = int(mask.sum())
        token = logprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return -(token * mask).sum() / max(count, 1), count


def naive_scores(
    model, rows, ids=None, temperature=1.0, with_entropy=False, top_k=0, chunk_size=None
) -> ResponseScores:
    """``batch_logprobs`` from the full log-softmax over every response position."""
    mask = rows.response_mask.bool()
    logprobs = full_log_softmax(response_logits(model, rows), temperature)
    if ids is None:
        picked = logprobs.gather(-1, rows.response_ids[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    else:
        picked = logprobs.gather(-1, ids.long()).masked_fill(~mask[..., None], 0.0)
    entropy = entropy_metric(logprobs).masked_fill(~mask, 0.0) if with_entropy else None
    topk_ids = topk_logprobs = None
    if top_k:
        top = logprobs.topk(top_k, dim=-1)
        topk_ids = top.indices.to(torch.int32).masked_fill(~mask[..., None], 0)
        topk_logprobs = top.values.masked_fill(~mask[..., None], 0.0)
    return ResponseScores(picked, entropy, topk_ids, topk_logprobs)


@contextmanager
def naive_head() -> Iterator[None]:
    """For the duration, the on-policy modules' ``batch_logprobs`` (RL's and OPD's losses, their rollout log-probs)
    is ``naive_scores``: the one name they call, swapped where they import it."""
    modules = (vlm_post.modules.on_policy, vlm_post.modules.rl, vlm_post.modules.distill)
    saved = [module.batch_logprobs for module in modules]
    for module in modules:
        module.batch_logprobs = naive_scores
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.batch_logprobs = original


class NaiveRL(RLModule):
    def training_step(self, *args, **kwargs):
        with naive_head():
            return super().training_step(*args, **kwargs)


class NaiveTeacher(HFTeacher):
    @torch.no_grad()
    def score(self, rows: ModelRows) -> TeacherBatch:
        scores = naive_scores(self.model, rows, top_k=self.top_k)
        return TeacherBatch(scores.topk_ids, scores.topk_logprobs, scores.logprobs, rows.response_mask.bool())


class NaiveDistill(DistillModule):
    """The student's top-k KL from full logits (DistillModule's ``batch_logprobs`` over the whole vocabulary)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = self.teacher_config
        self.teacher = NaiveTeacher(
            config.model_name_or_path, self.processor, config.top_k, config.dtype, self.attn_implementation
        )

    def training_step(self, *args, **kwargs):
        with naive_head():
            return super().training_step(*args, **kwargs)


NAIVE = {"sft": NaiveSFT, "rl": NaiveRL, "opd": NaiveDistill}
