"""Type and range checks of hyper-parameter dataclasses, with one-line errors.

A config is checked when it is built (in ``__post_init__``), so a bad value fails at once with a
message naming the field, instead of as a ``ZeroDivisionError``, a diverging run or a NaN deep
inside a jitted step. :func:`check_config` reads each field's annotation for its type (``bool``,
``int``, ``float``, ``str``, a ``Literal`` of choices, ``X | None``) and takes ranges from a
table of :data:`Rule` s by field name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from fippure.errors import InvalidInputError

#: ``(test, requirement)``: a value is accepted where ``test(value)`` holds; ``requirement``
#: completes "must be ..." in the error.
Rule = tuple[Callable[[Any], bool], str]


def at_least(low: float) -> Rule:
    """``value >= low``."""
    return (lambda v: v >= low, f">= {low}")


def interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """``value`` in the interval from ``low`` to ``high``, each end closed unless ``*_open``."""

    def test(v: Any) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    brackets = ("(" if low_open else "[", ")" if high_open else "]")
    return (test, f"in {brackets[0]}{low}, {high}{brackets[1]}")


AT_LEAST_ONE: Rule = at_least(1)
POSITIVE: Rule = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Rule = at_least(0)
#: ``[0, 1)``: momentum, label smoothing.
BELOW_ONE: Rule = interval(0, 1, high_open=True)
#: ``[0, 1]``: fractions.
FRACTION: Rule = interval(0, 1)
#: ``(0, 1]``: bounds and opacities that must not vanish.
UNIT_POSITIVE: Rule = interval(0, 1, low_open=True)
#: ``[0, 2**32)``: seeds, what ``jax.random.key`` and numpy take (as the CLI's seed flags).
SEED: Rule = interval(0, 2**32, high_open=True)


def is_integer(value: Any) -> bool:
    """An integer of any integral type (numpy's included), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(value: Any, name: str = "seed") -> None:
    """One-line error unless ``value`` is an integer in ``[0, 2**32)`` (not a bool or None).

    ``jax.random.key`` would alias 2**32 to 0 and -1 to 2**32 - 1 (the same run recorded under
    another seed), and numpy takes ``None`` as "a fresh draw every time" (no run to repeat).
    """
    in_range, _ = SEED
    if not is_integer(value) or not in_range(value):
        raise InvalidInputError(f"{name} must be an integer in [0, 2**32), got {value!r}")


def check_count(value: Any, name: str, minimum: int = 0) -> None:
    """One-line error unless ``value`` is an integer (not a bool) of at least ``minimum``: a
    step interval such as ``observe_every``."""
    if not is_integer(value) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def compile_pattern(pattern: str) -> re.Pattern:
    """``re.compile(pattern)``, with a one-line error for an invalid expression."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as error:
        raise InvalidInputError(f"invalid regular expression {pattern!r}: {error}") from None


def _compiles(pattern: str) -> bool:
    try:
        compile_pattern(pattern)
    except InvalidInputError:
        return False
    return True


#: A pattern for :func:`re.search` (module or parameter paths).
REGEX: Rule = (_compiles, "a valid regular expression")


def check_config(config: Any, rules: Mapping[str, Rule] | None = None) -> None:
    """Raises :class:`InvalidInputError` for the first field of ``config`` (a dataclass) whose
    value does not match its annotation or, where ``rules`` names it, its range.

    Floats must be finite. ``None`` passes an optional field without a range check. Rules for
    fields that ``config`` does not have are ignored, so one table can serve several configs.
    """
    owner = type(config).__name__
    hints = _type_hints(type(config))
    rules = rules or {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        where = f"{owner}.{field.name}"
        annotation = hints.get(field.name, Any)
        if value is None and _allows_none(annotation):
            continue
        check_type(value, _without_none(annotation), where)
        if field.name in rules:
            test, requirement = rules[field.name]
            if not test(value):
                raise InvalidInputError(f"{where} must be {requirement}, got {value!r}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(annotation)


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return options[0] if len(options) == 1 else Any
    return annotation


def check_type(value: Any, annotation: Any, where: str) -> None:
    """One-line error unless ``value`` fits ``annotation`` (``int``, ``float``, ``bool``,
    ``str``, a ``Literal``, or one of them ``| None``; other annotations are not checked)."""
    if _allows_none(annotation):
        if value is None:
            return
        annotation = _without_none(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise InvalidInputError(f"{where} must be one of {list(choices)}, got {value!r}")
    elif annotation is bool:
        if not isinstance(value, bool):
            raise InvalidInputError(f"{where} must be true or false, got {value!r}")
    elif annotation is int:
        if not is_integer(value):
            raise InvalidInputError(f"{where} must be an integer, got {value!r}")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidInputError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidInputError(f"{where} must be finite, got {value!r}")
    elif annotation is str and not isinstance(value, str):
        raise InvalidInputError(f"{where} must be a string, got {value!r}")
