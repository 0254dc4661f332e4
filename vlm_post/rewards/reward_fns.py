"""Reward functions for RL: a small protocol, the accuracy and format rewards, and loading one from a config.

A reward function maps a batch of responses and their Examples to one float
per response plus named components (logged separately)::

    reward_fn = load_reward_fn("vlm_post.rewards.MathReward", format_weight=0.1)
    out = reward_fn(responses, examples)   # out.reward, out.components["accuracy"], ["format"]

Classes take typed ``__init__`` arguments, so a config can name them by
``class_path`` with ``init_args`` (jsonargparse). A plain function
``f(responses, examples, **kwargs) -> list[float] | RewardOutput`` is accepted too.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlm_post.errors import ConfigError
from vlm_post.ranges import NonNegativeFloat, PositiveFloat
from vlm_post.rewards.extract import extract_boxed
from vlm_post.rewards.grading import grade
from vlm_post.rewards.math_equal import NUMERIC_REL_TOL
from vlm_post.rewards.sympy_pool import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from vlm_post.data.schema import Example

# EasyR1/verl's math reward: 0.9 * accuracy + 0.1 * format.
DEFAULT_ACCURACY_WEIGHT = 0.9
DEFAULT_FORMAT_WEIGHT = 0.1


@dataclass
class RewardOutput:
    """Per-response rewards, and the named components they were made of (e.g. accuracy, format)."""

    reward: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.components.items():
            if len(values) != len(self.reward):
                raise ValueError(f"reward component {name!r} has {len(values)} values for {len(self.reward)} rewards")


class RewardFn:
    """Base class (and protocol) of reward functions: ``__call__(responses, examples) -> RewardOutput``."""

    def __call__(self, responses: list[str], examples: list[Example]) -> RewardOutput:
        raise NotImplementedError


class AccuracyReward(RewardFn):
    """1.0 for a correct boxed answer (``grade``), else 0.0.

    Args:
        rel_tol: relative tolerance of numeric comparisons.
        timeout_s: the most one symbolic comparison may take.
        batch_budget_s: the most symbolic comparisons may take over one call, so that a batch of
            adversarial answers cannot stall the training loop; once spent, answers that would need
            sympy are graded wrong (and counted as timeouts). None: no budget.
    """

    def __init__(
        self,
        rel_tol: NonNegativeFloat = NUMERIC_REL_TOL,
        timeout_s: PositiveFloat = DEFAULT_TIMEOUT_S,
        batch_budget_s: PositiveFloat | None = 10.0,
    ):
        if rel_tol < 0 or timeout_s <= 0 or (batch_budget_s is not None and batch_budget_s < 0):
            raise ConfigError("AccuracyReward: rel_tol must be >= 0, timeout_s > 0 and batch_budget_s >= 0")
        self.rel_tol, self.timeout_s, self.batch_budget_s = rel_tol, timeout_s, batch_budget_s

    def scores(self, responses: list[str], examples: list[Example]) -> list[float]:
        deadline = None if self.batch_budget_s is None else time.monotonic() + self.batch_budget_s
        scores = []
        for response, example in zip(responses, examples, strict=True):
            timeout = self.timeout_s if deadline is None else max(0.0, min(self.timeout_s, deadline - time.monotonic()))
            correct, _ = grade(response, example, rel_tol=self.rel_tol, timeout_s=timeout)
            scores.append(1.0 if correct else 0.0)
        return scores

    def __call__(self, responses: list[str], examples: list[Example]) -> RewardOutput:
        accuracy = self.scores(responses, examples)
        return RewardOutput(list(accuracy), {"accuracy": accuracy})


class FormatReward(RewardFn):
    """1.0 when the response reasons in one ``<think>...</think>`` block, then gives a ``\\boxed{}`` answer.

    Args:
        think: require the think block; False: only the box.
        prompt_opens_think: the chat template already ends the prompt with ``<think>``, so the
            response starts inside the block and only ``</think>`` must appear.
        require_reasoning: the think block must hold some text. EasyR1's format regex accepts an
            empty one; set False for that, or for answer-only targets like the CPU demo's.
    """

    def __init__(self, think: bool = True, prompt_opens_think: bool = False, require_reasoning: bool = True):
        self.think, self.prompt_opens_think = think, prompt_opens_think
        self.require_reasoning = require_reasoning

    def is_formatted(self, response: str) -> bool:
        if not isinstance(response, str):
            return False
        if not self.think:
            return extract_boxed(response) is not None
        text = response.strip()
        opens, closes = text.count("<think>"), text.count("</think>")
        if self.prompt_opens_think:
            if opens != 0 or closes != 1:
                return False
        elif opens != 1 or closes != 1 or not text.startswith("<think>"):
            return False
        reasoning, _, answer = text.partition("</think>")
        if self.require_reasoning and not reasoning.replace("<think>", "").strip():
            return False
        return extract_boxed(answer) is not None

    def scores(self, responses: list[str], examples: list[Example] | None = None) -> list[float]:
        return [1.0 if self.is_formatted(r) else 0.0 for r in responses]

    def __call__(self, responses: list[str], examples: list[Example]) -> RewardOutput:
        formatted = self.scores(responses)
        return RewardOutput(list(formatted), {"format": formatted})


class MathReward(RewardFn):
    """``accuracy_weight * accuracy + format_weight * format``: the usual RL reward for boxed math answers.

    Args:
        accuracy_weight: weight of ``AccuracyReward`` (EasyR1/verl: 0.9).
        format_weight: weight of ``FormatReward`` (EasyR1/verl: 0.1).
        rel_tol, timeout_s, batch_budget_s: as for ``AccuracyReward``.
        think, prompt_opens_think, require_reasoning: as for ``FormatReward``.
    """

    def __init__(
        self,
        accuracy_weight: NonNegativeFloat = DEFAULT_ACCURACY_WEIGHT,
        format_weight: NonNegativeFloat = DEFAULT_FORMAT_WEIGHT,
        rel_tol: NonNegativeFloat = NUMERIC_REL_TOL,
        timeout_s: PositiveFloat = DEFAULT_TIMEOUT_S,
        batch_budget_s: PositiveFloat | None = 10.0,
        think: bool = True,
        prompt_opens_think: bool = False,
        require_reasoning: bool = True,
    ):
        self.accuracy_weight, self.format_weight = float(accuracy_weight), float(format_weight)
        self.accuracy = AccuracyReward(rel_tol=rel_tol, timeout_s=timeout_s, batch_budget_s=batch_budget_s)
        self.format = FormatReward(
            think=think, prompt_opens_think=prompt_opens_think, require_reasoning=require_reasoning
        )

    def __call__(self, responses: list[str], examples: list[Example]) -> RewardOutput:
        accuracy = self.accuracy.scores(responses, examples)
        formatted = self.format.scores(responses)
        reward = [self.accuracy_weight * a + self.format_weight * f for a, f in zip(accuracy, formatted)]
        return RewardOutput(reward, {"accuracy": accuracy, "format": formatted})


class WeightedSum(RewardFn):
    """A weighted sum of other reward functions; their components are kept, prefixed by their name.

    Args:
        rewards: reward functions by name.
        weights: a weight per name (missing names weigh 1.0).
    """

    def __init__(self, rewards: dict[str, RewardFn], weights: dict[str, float] | None = None):
        if not rewards:
            raise ConfigError("WeightedSum: 'rewards' is empty")
        unknown = set(weights or {}) - set(rewards)
        if unknown:
            raise ConfigError(f"WeightedSum: weights for unknown rewards {sorted(unknown)}")
        self.rewards = {name: load_reward_fn(fn) for name, fn in rewards.items()}
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in rewards}

    def __call__(self, responses: list[str], examples: list[Example]) -> RewardOutput:
        total = [0.0] * len(responses)
        components: dict[str, list[float]] = {}
        for name, fn in self.rewards.items():
            out = fn(responses, examples)
            total = [t + self.weights[name] * r for t, r in zip(total, out.reward)]
            components[name] = list(out.reward)
            components.update({f"{name}/{key}": values for key, values in out.components.items()})
        return RewardOutput(total, components)


class FunctionReward(RewardFn):
    """A plain function ``f(responses, examples, **kwargs)`` returning a list of floats or a RewardOutput."""

    def __init__(self, function: Callable[..., Any], **kwargs: Any):
        self.function, self.kwargs = function, kwargs
        self.name = getattr(function, "__name__", "reward")

    def __call__(self, responses: list[str], examples: list[Example]) -> RewardOutput:
        out = self.function(responses, examples, **self.kwargs)
        if isinstance(out, RewardOutput):
            return out
        rewards = [float(r) for r in out]
        if len(rewards) != len(responses):
            raise ValueError(
                f"reward function {self.name!r} returned {len(rewards)} rewards for {len(responses)} responses"
            )
        return RewardOutput(rewards, {self.name: list(rewards)})


def _import(path: str) -> Any:
    module_name, sep, attribute = path.replace(":", ".").rpartition(".")
    if not sep or not module_name:
        raise ConfigError(f"reward function {path!r}: expected a dotted path like 'package.module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward function {path!r}: cannot import module {module_name!r} ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"reward function {path!r}: module {module_name!r} has no {attribute!r}") from None


def load_reward_fn(spec: str | Mapping[str, Any] | RewardFn | Callable[..., Any], **kwargs: Any) -> RewardFn:
    """A RewardFn from a dotted path (``"pkg.module.Name"`` or ``"pkg.module:function"``), a
    ``{"class_path": ..., "init_args": {...}}`` mapping, an instance, a class or a function.
    ``kwargs`` go to the class's ``__init__`` (or are bound to the function's call)."""
    if isinstance(spec, RewardFn):
        if kwargs:
            raise ConfigError("load_reward_fn: keyword arguments given for an already built reward function")
        return spec
    if isinstance(spec, Mapping):
        if "class_path" not in spec:
            raise ConfigError(f"reward function config {dict(spec)!r} has no 'class_path'")
        return load_reward_fn(spec["class_path"], **{**dict(spec.get("init_args") or {}), **kwargs})
    target = _import(spec) if isinstance(spec, str) else spec
    if isinstance(target, type):
        try:
            instance = target(**kwargs)
        except TypeError as error:
            raise ConfigError(f"reward function {getattr(target, '__name__', spec)!r}: {error}") from None
        if isinstance(instance, RewardFn):
            return instance
        if not callable(instance):
            raise ConfigError(f"reward function {spec!r}: instances of {target.__name__} are not callable")
        return FunctionReward(instance)
    if callable(target):
        return FunctionReward(target, **kwargs)
    raise ConfigError(f"reward function {spec!r} is neither a class nor a function")
