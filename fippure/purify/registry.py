"""Defenses built by name, with configs overridden from ``key=value`` strings."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from fippure.errors import InvalidInputError, UnknownNameError


@dataclasses.dataclass(frozen=True)
class Defense:
    """A registered defense.

    Attributes:
        name: registry name (``fip``, ``nft``, ...).
        module: the module holding ``purify`` and the config class.
        config_name: the config dataclass's name in that module.
        summary: one line for ``--help``.
    """

    name: str
    module: str
    config_name: str
    summary: str

    @property
    def purify(self) -> Callable:
        """The module's ``purify``, bound to this defense's config class: a missing config is
        its default, and a config of another class is refused (FT-SAM's config subclasses
        FT's, so without this check each name would run the other defense)."""
        function = importlib.import_module(self.module).purify
        config_class, name = self.config_class, self.name
        signature = inspect.signature(function)

        @functools.wraps(function)
        def purify(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            config = bound.arguments.get("config")
            if config is None:
                bound.arguments["config"] = config_class()
            elif type(config) is not config_class:
                raise InvalidInputError(
                    f"{name} takes a {config_class.__name__}, got {type(config).__name__}; "
                    f"make_config({name!r}, overrides) builds one"
                )
            return function(*bound.args, **bound.kwargs)

        return purify

    @property
    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)


DEFENSES: dict[str, Defense] = {
    d.name: d
    for d in (
        Defense("fip", "fippure.purify.fip", "FIPConfig", "Fisher-information-guided purification"),
        Defense(
            "fast_fip",
            "fippure.purify.fast_fip",
            "FastFIPConfig",
            "FIP over one shift per singular value of every kernel",
        ),
        Defense("nft", "fippure.purify.nft", "NFTConfig", "BN-channel mask fine-tuning with MixUp"),
        Defense(
            "ngf", "fippure.purify.ngf", "NGFConfig", "natural-gradient fine-tuning of one layer"
        ),
        Defense("ft", "fippure.purify.ft", "FTConfig", "plain fine-tuning of all weights"),
        Defense("ft_sam", "fippure.purify.ft", "FTSAMConfig", "fine-tuning with adaptive SAM"),
    )
}


def get_defense(name: str) -> Defense:
    """The registered defense ``name`` (``fip``, ``fast_fip``, ``nft``, ``ngf``, ``ft``,
    ``ft_sam``): where its ``purify`` function and config class live.

    Args:
        name: registry name, a key of :data:`DEFENSES`.

    Returns:
        The :class:`Defense` record.

    Raises:
        UnknownNameError: for an unknown name (the message suggests the close ones).
    """
    if name not in DEFENSES:
        raise UnknownNameError("defense", name, DEFENSES)
    return DEFENSES[name]


def make_config(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The default config of defense ``name`` with ``overrides`` (strings are parsed).

    Args:
        name: registry name of the defense (``fip``, ``nft``, ...).
        overrides: ``{field: value}`` for its config; strings are parsed by the field's type
            (``"0.01"``, ``"true"``, ``"a,b"`` for a tuple, ``"none"`` for an optional field).
            ``None``: the defaults.

    Returns:
        An instance of the defense's config class (:attr:`Defense.config_class`).

    Raises:
        UnknownNameError: for an unknown defense or config key.
        InvalidInputError: for a value of the wrong type or out of range.
    """
    return config_with_overrides(get_defense(name).config_class, overrides, name)


def config_with_overrides(cls: type, overrides: Mapping[str, Any] | None, name: str) -> Any:
    """``cls(**overrides)`` for a config dataclass, with string values parsed by the fields'
    types and one-line errors naming ``name`` (``"fip"``, ``"trigger inversion"``).

    Raises:
        UnknownNameError: for a key that is not a field of ``cls``.
        InvalidInputError: for a value of the wrong type or out of range.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise UnknownNameError(f"{name} option", key, fields)
        values[key] = parse_value(raw, hints[key], f"{name}.{key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"invalid {name} config: {error}") from None


def parse_value(raw: Any, annotation: Any, where: str) -> Any:
    """Converts ``raw`` (often a string from the command line) to ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        text = raw if not isinstance(raw, str) else raw.strip()
        if text not in args:
            raise InvalidInputError(f"{where} must be one of {list(args)}, got {raw!r}")
        return text
    if origin in (typing.Union, types.UnionType):
        if raw is None or isinstance(raw, str) and raw.lower() in ("none", "null"):
            if type(None) in args:
                return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return parse_value(raw, option, where)
            except InvalidInputError as error:
                errors.append(str(error))
        raise InvalidInputError(errors[0] if errors else f"cannot parse {where}={raw!r}")
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        inner = args[0] if args else str
        return tuple(parse_value(item, inner, where) for item in items)
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise InvalidInputError(f"{where} must be true or false, got {raw!r}")
    if annotation in (int, float, str):
        if not isinstance(raw, str):
            return raw  # a Python value: the config's own checks judge it (3.7 is no int)
        try:
            value = annotation(raw)
        except (TypeError, ValueError):
            kind = {int: "an integer", float: "a number", str: "a string"}[annotation]
            raise InvalidInputError(f"{where} must be {kind}, got {raw!r}") from None
        if annotation is int and str(value) != raw.strip():
            raise InvalidInputError(f"{where} must be an integer, got {raw!r}")
        return value
    return raw
