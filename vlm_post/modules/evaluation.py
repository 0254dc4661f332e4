"""Evaluation, shared by validation inside fit and ``vlm_post test`` in every module.

For each batch of problems:
  1. optionally a greedy answer (``greedy_accuracy``);
  2. ``n`` sampled answers at ``temperature`` (mean@n accuracy, pass@k, maj@k, answer diversity);
  3. the policy's full-vocabulary entropy on the sampled tokens, from one extra
     forward over prompt + response (chunked over tokens, never the whole batch's logits);
  4. grading with the time-bounded grader; format compliance and response length.

``accuracy`` is the greedy accuracy when ``greedy`` is on, mean@n otherwise.
``vlm_post test`` also writes per-problem JSONL and ``summary.json`` with
problem-level bootstrap confidence intervals for accuracy, pass@k and maj@k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlm_post.errors import ConfigError
from vlm_post.metrics import bootstrap_ci, majority_at_k_per_problem, pass_at_k_per_problem
from vlm_post.models.logprobs import batch_logprobs
from vlm_post.ranges import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFraction,
    PositiveInt,
    check_ranges,
)
from vlm_post.rewards import grade, normalize_answer
from vlm_post.rollout import RolloutBatch, SamplingParams


@dataclass
class EvalConfig:
    """How evaluation samples and what it reports.

    Args:
        n: sampled responses per problem (0: greedy only).
        temperature: sampling temperature for the ``n`` samples (entropy is that of the sampling distribution).
        top_p: nucleus sampling.
        top_k: top-k sampling (0: off).
        max_new_tokens: response budget.
        greedy: also decode one greedy answer per problem.
        pass_k: the k of pass@k and maj@k (default: 1, 2, 4, ... below n, and n itself).
        entropy: measure the policy's token entropy on the samples (one extra forward pass).
        forward_batch_size: rows per entropy forward pass.
        bootstrap_resamples: resamples of problems for the confidence intervals (test only).
        confidence: confidence level of the intervals.
        seed: seed of the bootstrap.
        output_dir: where ``test`` writes ``<set>.jsonl`` and ``summary.json`` (default ``<log_dir>/eval``).
        engine: what samples: ``hf`` (``generate`` on the policy itself) or ``vllm`` (an engine given the
            policy's weights; settings in ``model.vllm``). The entropy pass is a policy forward either way.
    """

    n: NonNegativeInt = 16
    temperature: NonNegativeFloat = 1.0
    top_p: PositiveFraction = 1.0
    top_k: NonNegativeInt = 0
    max_new_tokens: PositiveInt = 1024
    greedy: bool = True
    pass_k: list[PositiveInt] | None = None
    entropy: bool = True
    forward_batch_size: PositiveInt = 16
    bootstrap_resamples: PositiveInt = 10_000
    confidence: OpenUnitInterval = 0.95
    seed: NonNegativeInt = 0
    output_dir: str | None = None
    engine: Literal["hf", "vllm"] = "hf"

    def __post_init__(self) -> None:
        check_ranges(self)
        # "eval" stands for either key: model.init_args.eval (vlm_post test) or .val (validation in fit).
        if self.n == 0 and not self.greedy:
            raise ConfigError("eval.n: 0 samples and greedy: false evaluate nothing; set n >= 1 or greedy: true")
        if self.pass_k is None:
            # powers of two, and n itself, so pass@n is there whatever n is (n = 12: 1, 2, 4, 8, 12)
            self.pass_k = sorted({2**i for i in range(self.n.bit_length()) if 2**i < self.n} | {self.n} - {0})
        bad = [k for k in self.pass_k if not 1 <= k <= self.n]
        if bad:
            raise ConfigError(f"eval.pass_k: {bad} must lie in [1, n={self.n}] (pass@k needs k of the n samples)")

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.n, self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.engine)

    def greedy_sampling(self) -> SamplingParams:
        return SamplingParams(1, 0.0, 1.0, 0, self.max_new_tokens, self.engine)


@dataclass
class BatchEvaluation:
    """What one batch produced, per problem (B problems, n samples each)."""

    greedy_texts: list[str] | None
    greedy_graded: list[tuple[bool, str | None]] | None
    greedy_lengths: torch.Tensor | None  # (B,)
    sample_texts: list[list[str]]
    sample_graded: list[list[tuple[bool, str | None]]]
    sample_lengths: torch.Tensor  # (B, n) response tokens
    token_entropy: torch.Tensor | None  # (B*n, L) per sampled token, 0 past a response's end
    response_mask: torch.Tensor | None  # (B*n, L)

    def select(self, problems: list[int]) -> BatchEvaluation:
        """Only the given problems (e.g. without an evaluation sampler's fillers)."""
        n = self.sample_lengths.shape[1] if self.sample_lengths.ndim == 2 else 0
        rows = [problem * n + j for problem in problems for j in range(n)]
        pick = lambda values: [values[i] for i in problems] if values is not None else None
        return BatchEvaluation(
            pick(self.greedy_texts),
            pick(self.greedy_graded),
            self.greedy_lengths[problems] if self.greedy_lengths is not None else None,
            pick(self.sample_texts),
            pick(self.sample_graded),
            self.sample_lengths[problems],
            self.token_entropy[rows] if self.token_entropy is not None else None,
            self.response_mask[rows] if self.response_mask is not None else None,
        )

    def metric_fields(self) -> dict:
        """Keyword arguments of ``EvalMetrics.update_from``."""
        correct = torch.tensor([[ok for ok, _ in graded] for graded in self.sample_graded], dtype=torch.bool)
        formatted = torch.tensor(
            [[a is not None for _, a in graded] for graded in self.sample_graded], dtype=torch.bool
        )
        return dict(
            greedy_correct=[ok for ok, _ in self.greedy_graded] if self.greedy_graded else None,
            greedy_formatted=[a is not None for _, a in self.greedy_graded] if self.greedy_graded else None,
            greedy_lengths=self.greedy_lengths,
            sample_correct=correct.reshape(len(self.sample_graded), -1),
            sample_formatted=formatted.reshape(len(self.sample_graded), -1),
            sample_lengths=self.sample_lengths,
            answers=self.normalized_answers(),
            token_entropy=self.token_entropy,
            entropy_mask=self.response_mask,
        )

    def records(self, examples) -> list[dict]:
        rows = []
        for i, example in enumerate(examples):
            row = {"id": example.id, "answer": example.answer}
            if self.greedy_texts is not None:
                row.update(
                    greedy_response=self.greedy_texts[i],
                    greedy_extracted=self.greedy_graded[i][1],
                    greedy_correct=self.greedy_graded[i][0],
                )
            row.update(
                responses=self.sample_texts[i],
                extracted=[answer for _, answer in self.sample_graded[i]],
                correct=[ok for ok, _ in self.sample_graded[i]],
                response_lengths=self.sample_lengths[i].tolist(),
            )
            if self.token_entropy is not None:
                n = len(self.sample_texts[i])
                tokens = self.response_mask[i * n : (i + 1) * n].bool()
                row["mean_token_entropy"] = (
                    float(self.token_entropy[i * n : (i + 1) * n][tokens].mean()) if tokens.any() else None
                )
            rows.append(row)
        return rows

    def normalized_answers(self) -> list[list[str | None]]:
        return [[normalize_answer(a) if a is not None else None for _, a in graded] for graded in self.sample_graded]


def _grade_all(texts: list[str], examples) -> list[tuple[bool, str | None]]:
    return [grade(text, example) for text, example in zip(texts, examples)]


def _per_problem(values: list, n: int) -> list[list]:
    return [values[i * n : (i + 1) * n] for i in range(len(values) // n)] if n else []


def evaluate_batch(module, batch: dict, config: EvalConfig) -> BatchEvaluation:
    """Sample, grade and measure one batch with ``module``'s policy and the engine ``config`` names."""
    examples = batch["examples"]
    greedy_texts = greedy_graded = greedy_lengths = None
    engine = module.rollout_engine(config.engine)
    if config.greedy:
        greedy = engine.sample(module.policy, batch, config.greedy_sampling())
        greedy_texts, greedy_lengths = greedy.texts, greedy.lengths
        greedy_graded = _grade_all(greedy_texts, examples)
    n = config.n
    entropy = mask = None
    if n:
        samples = engine.sample(module.policy, batch, config.sampling())
        sample_examples = [examples[int(i)] for i in samples.prompt_index]
        graded = _per_problem(_grade_all(samples.texts, sample_examples), n)
        texts = _per_problem(samples.texts, n)
        lengths = samples.lengths.view(len(examples), n)
        if config.entropy:
            entropy, mask = sampled_token_entropy(module, samples, config), samples.response_mask
    else:
        texts, graded, lengths = [[] for _ in examples], [[] for _ in examples], torch.zeros(len(examples), 0)
    return BatchEvaluation(greedy_texts, greedy_graded, greedy_lengths, texts, graded, lengths, entropy, mask)


@torch.no_grad()
def sampled_token_entropy(module, samples: RolloutBatch, config: EvalConfig) -> torch.Tensor:
    """Per-token entropy (B*n, L) of the sampling distribution at the sampled positions, in row micro-batches."""
    out = torch.zeros(samples.response_mask.shape, dtype=torch.float32, device=samples.response_mask.device)
    step = max(1, config.forward_batch_size)
    for start in range(0, samples.num_rows, step):
        chunk = slice(start, min(samples.num_rows, start + step))
        rows = samples.rows(chunk)
        scores = batch_logprobs(
            module.policy, rows, temperature=config.temperature, with_entropy=True, chunk_size=module.logprob_chunk_size
        )
        out[chunk] = scores.entropy
    return out


def confidence_intervals(records: list[dict], config: EvalConfig) -> dict[str, tuple[float, float]]:
    """Problem-level bootstrap intervals for accuracy (and mean@n), each pass@k and each maj@k."""
    if not records:
        return {}
    ci = lambda values: bootstrap_ci(values, config.bootstrap_resamples, config.confidence, config.seed)
    out = {}
    if config.greedy:
        out["accuracy"] = ci(torch.tensor([float(r["greedy_correct"]) for r in records]))
    if config.n:
        correct = torch.tensor([r["correct"] for r in records], dtype=torch.bool)
        out["mean_accuracy"] = ci(correct.float().mean(-1))
        if not config.greedy:
            out["accuracy"] = out["mean_accuracy"]
        answers = [[normalize_answer(a) if a is not None else None for a in r["extracted"]] for r in records]
        for k in config.pass_k:
            samples = torch.full((correct.shape[0],), correct.shape[1])
            out[f"pass@{k}"] = ci(pass_at_k_per_problem(samples, correct.sum(-1), k))
            out[f"maj@{k}"] = ci(majority_at_k_per_problem(answers, correct.tolist(), k))
    return {key: (float(low), float(high)) for key, (low, high) in out.items()}


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)"
    columns = list(rows[0])
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells])
