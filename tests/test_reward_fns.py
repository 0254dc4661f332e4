"""RL reward functions: accuracy + format with configurable weights, loading from a config, the batch time budget."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from vlm_post.data.schema import Example
from vlm_post.errors import ConfigError
from vlm_post.rewards import (
    AccuracyReward,
    FormatReward,
    FunctionReward,
    MathReward,
    RewardFn,
    RewardOutput,
    WeightedSum,
    grading_stats,
    load_reward_fn,
)

pytestmark = pytest.mark.fast

IMAGE = Image.new("RGB", (2, 2))
GEO = Example(
    id="15",
    images=[IMAGE],
    question="q",
    answer="5\\sqrt{3}",
    source="geo3k",
    choices=["5", "5\\sqrt{2}", "5\\sqrt{3}", "10"],
)
RIGHT_FORMATTED = "<think>The height is 10 sin 60.</think> The answer is \\boxed{5\\sqrt{3}}."
RIGHT_UNFORMATTED = "The answer is \\boxed{C}."
WRONG_FORMATTED = "<think>Guess.</think> \\boxed{10}"
NOTHING = "I do not know."


def length_penalty(responses: list[str], examples: list[Example], scale: float = 0.001) -> list[float]:
    """A plain reward function, loaded by dotted path in the tests below."""
    return [-scale * len(r) for r in responses]


def test_math_reward_uses_the_easyr1_weights_by_default():
    out = MathReward()([RIGHT_FORMATTED, RIGHT_UNFORMATTED, WRONG_FORMATTED, NOTHING], [GEO] * 4)
    assert out.components["accuracy"] == [1.0, 1.0, 0.0, 0.0]
    assert out.components["format"] == [1.0, 0.0, 1.0, 0.0]
    assert out.reward == pytest.approx([1.0, 0.9, 0.1, 0.0])


def test_math_reward_weights_are_configurable():
    out = MathReward(accuracy_weight=1.0, format_weight=0.5)([RIGHT_FORMATTED, WRONG_FORMATTED], [GEO, GEO])
    assert out.reward == pytest.approx([1.5, 0.5])


@pytest.mark.parametrize(
    ("response", "think", "opens", "expected"),
    [
        ("<think>reasoning</think>\n\\boxed{3}", True, False, True),
        ("  <think>a</think> so \\boxed{x = 3}.", True, False, True),
        ("<think>reasoning</think> 3", True, False, False),  # no box
        ("\\boxed{3} <think>late</think>", True, False, False),  # the box must follow the reasoning
        ("<think>a</think><think>b</think>\\boxed{3}", True, False, False),  # one think block
        ("<think></think>\\boxed{3}", True, False, False),  # empty reasoning
        ("<think>a \\boxed{3}</think>", True, False, False),  # the box inside the reasoning does not count
        ("reasoning</think> \\boxed{3}", True, True, True),  # the prompt already opened <think>
        ("<think>reasoning</think> \\boxed{3}", True, True, False),
        ("\\boxed{3}", False, False, True),
        ("3", False, False, False),
    ],
)
def test_format_reward(response, think, opens, expected):
    assert FormatReward(think=think, prompt_opens_think=opens).is_formatted(response) is expected


def test_format_reward_can_accept_an_empty_think_block():
    assert FormatReward(require_reasoning=False).is_formatted("<think></think>\\boxed{3}")
    assert not FormatReward(require_reasoning=False).is_formatted("<think></think> 3")
    out = MathReward(require_reasoning=False)(["<think></think>\\boxed{red}"], [GEO])
    assert out.components["format"] == [1.0]


def test_load_reward_fn_by_dotted_path_mapping_class_and_function():
    by_path = load_reward_fn("vlm_post.rewards.MathReward", format_weight=0.2, accuracy_weight=0.8)
    assert isinstance(by_path, MathReward) and by_path.format_weight == 0.2
    by_module_path = load_reward_fn("vlm_post.rewards.reward_fns:AccuracyReward", rel_tol=1e-3)
    assert isinstance(by_module_path, AccuracyReward) and by_module_path.rel_tol == 1e-3
    by_mapping = load_reward_fn({"class_path": "vlm_post.rewards.FormatReward", "init_args": {"think": False}})
    assert isinstance(by_mapping, FormatReward) and by_mapping.think is False
    function = load_reward_fn("tests.test_reward_fns.length_penalty", scale=0.5)
    assert isinstance(function, FunctionReward)
    out = function(["ab", "abcd"], [GEO, GEO])
    assert out.reward == [-1.0, -2.0] and out.components == {"length_penalty": [-1.0, -2.0]}
    instance = MathReward()
    assert load_reward_fn(instance) is instance


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("vlm_post.rewards.NoSuchReward", {}, "has no 'NoSuchReward'"),
        ("no_such_package.rewards.Reward", {}, "cannot import module"),
        ("MathReward", {}, "dotted path"),
        ("vlm_post.rewards.MathReward", {"format_wieght": 0.1}, "format_wieght"),
        ({"init_args": {}}, {}, "no 'class_path'"),
        ("vlm_post.rewards.NUMERIC_REL_TOL", {}, "neither a class nor a function"),
    ],
)
def test_load_reward_fn_errors_name_the_culprit(spec, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_reward_fn(spec, **kwargs)


def test_reward_fns_are_configurable_by_jsonargparse_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardFn)
    config = parser.parse_object(
        {
            "reward": {
                "class_path": "vlm_post.rewards.MathReward",
                "init_args": {"accuracy_weight": 0.7, "format_weight": 0.3},
            }
        }
    )
    reward = parser.instantiate_classes(config).reward
    assert isinstance(reward, MathReward) and (reward.accuracy_weight, reward.format_weight) == (0.7, 0.3)
    with pytest.raises(Exception, match="accuracy_weight"):
        parser.parse_object(
            {"reward": {"class_path": "vlm_post.rewards.MathReward", "init_args": {"accuracy_weight": "high"}}}
        )


def test_weighted_sum_keeps_named_components():
    reward = WeightedSum(
        {"math": {"class_path": "vlm_post.rewards.MathReward"}, "length": FunctionReward(length_penalty, scale=0.01)},
        weights={"length": 2.0},
    )
    out = reward([RIGHT_FORMATTED, NOTHING], [GEO, GEO])
    assert set(out.components) == {"math", "math/accuracy", "math/format", "length", "length/length_penalty"}
    assert out.reward == pytest.approx([1.0 - 2 * 0.01 * len(RIGHT_FORMATTED), -2 * 0.01 * len(NOTHING)])
    with pytest.raises(ConfigError, match="unknown rewards"):
        WeightedSum({"math": MathReward()}, weights={"other": 1.0})


def test_reward_output_checks_lengths():
    with pytest.raises(ValueError, match="accuracy"):
        RewardOutput([1.0, 0.0], {"accuracy": [1.0]})
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        FunctionReward(lambda responses, examples: [0.0])(["a", "b"], [GEO, GEO])


def test_batch_budget_bounds_symbolic_grading():
    symbolic = Example(id="s", images=[IMAGE], question="q", answer="3x + 4", source="s")
    responses = [f"<think>t</think> \\boxed{{{k}x + 4 + 0y}}" for k in range(2, 40)]  # distinct, each needs sympy
    before = grading_stats().snapshot()
    start = time.monotonic()
    out = AccuracyReward(batch_budget_s=0.0)(
        responses + ["\\boxed{3x + 4}", "\\boxed{7}"], [symbolic] * len(responses) + [symbolic, GEO]
    )
    assert time.monotonic() - start < 1.0  # no budget left: no sympy, answers that needed it are wrong
    assert out.reward[-2:] == [1.0, 0.0]  # the string and numeric fast paths still grade
    assert grading_stats().timeouts - before["timeouts"] == len(responses)
    assert AccuracyReward()(["\\boxed{3x+4+0y}"], [symbolic]).reward == [1.0]  # with a budget, sympy decides


def test_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        AccuracyReward(rel_tol=-1)
    with pytest.raises(ValueError):
        MathReward()(["a"], [GEO, GEO])  # one example per response
