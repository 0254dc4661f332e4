"""The valid range of every numeric option, as its type.

An option typed ``PositiveInt`` (or any type here) is checked when the config is parsed,
before any weights load, and a value out of range is one line naming the key and the range:

    model.init_args.rollout.n: Not of type PositiveInt: 0 does not conform to restriction v>0

Options are typed with these rather than ``int``/``float``; tests/faults/test_steps_options_checkpoints.py walks every
module's signature and fails on a bare one. Values parsed from a config are instances of these
types (subclasses of int and float); ``plain_values`` turns them back into int and float
before a checkpoint keeps them, so it loads without them (weights_only too).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

# (0, 1]: top-p, a fraction that may be all but not none.
PositiveFraction = restricted_number_type("PositiveFraction", float, [(">", 0.0), ("<=", 1.0)])
# [0, 1): Adam's betas, PPO's lower clip (1 would divide by zero, or clip the ratio to 0).
ProperFraction = restricted_number_type("ProperFraction", float, [(">=", 0.0), ("<", 1.0)])
# (1, inf): PPO's dual clip (it caps a loss above the unclipped one).
AboveOne = restricted_number_type("AboveOne", float, [(">", 1.0)])

RANGE_TYPES = (
    PositiveInt,
    NonNegativeInt,
    PositiveFloat,
    NonNegativeFloat,
    ClosedUnitInterval,
    OpenUnitInterval,
    PositiveFraction,
    ProperFraction,
    AboveOne,
)


def check_ranges(config: object) -> None:
    """A config dataclass built in Python (not parsed) checked against its fields' range types.

    Config dataclasses call this from ``__post_init__``, so the type stays the one place a range is said.
    """
    from vlm_post.errors import ConfigError

    for name, hint in _field_hints(type(config)).items():
        try:
            _check(hint, getattr(config, name))
        except ValueError as error:
            raise ConfigError(f"{type(config).__name__}.{name}: {error}") from None


@functools.cache
def _field_hints(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _check(hint: object, value: object) -> None:
    """Raise ValueError where ``value`` breaks a range type in ``hint`` (also in ``T | None``, ``list[T]``, ``tuple``)."""
    if value is None:
        return
    if hint in RANGE_TYPES:
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # else another arm of a Union
            hint(value)
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            _check(arm, value)
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        per_item = args if origin is tuple and Ellipsis not in args else (args[0],) * len(value)
        for arm, item in zip(per_item, value):
            _check(arm, item)


def plain_values(value: object) -> object:
    """``value`` with every range-typed number inside it (dicts, lists, tuples, dataclasses) as a plain int or float.

    jsonargparse casts parsed numbers to their range type (``PositiveInt(3)``), and a pickle of one names a class
    that exists only once this module ran, which ``torch.load(weights_only=True)`` refuses anyway.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return type(value)((key, plain_values(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(plain_values(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {field.name: plain_values(getattr(value, field.name)) for field in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value
