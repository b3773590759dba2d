"""Attacks built by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from fippure.attacks.badnets import BadNets
from fippure.attacks.base import Attack
from fippure.attacks.blend import Blend
from fippure.attacks.bpp import BPP
from fippure.attacks.clb import CLB
from fippure.attacks.ftrojan import FTrojan
from fippure.attacks.input_aware import InputAware
from fippure.attacks.issba import ISSBA
from fippure.attacks.lf import LF
from fippure.attacks.lira import LIRA
from fippure.attacks.sig import SIG
from fippure.attacks.trojan import Trojan
from fippure.attacks.wanet import WaNet
from fippure.errors import InvalidInputError, UnknownNameError

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (BadNets, Blend, Trojan, SIG, WaNet, BPP, LF, FTrojan, CLB, InputAware, LIRA, ISSBA)
}


def make_attack(name: str, **options: Any) -> Attack:
    """The attack ``name`` with hyper-parameters ``options`` (defaults from SPEC section 7).

    Args:
        name: registry name, a key of :data:`ATTACKS` (``badnets``, ``blend``, ...).
        **options: values of the attack's dataclass fields; fields left out keep their
            defaults.

    Returns:
        The attack, a frozen (hashable) instance of its :class:`Attack` subclass.

    Raises:
        UnknownNameError: for an unknown attack.
        InvalidInputError: for an option the attack does not have, or a value of the wrong
            type or out of range.
    """
    if name not in ATTACKS:
        raise UnknownNameError("attack", name, ATTACKS)
    cls = ATTACKS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InvalidInputError(
            f"attack {name} has no option(s) {unknown}; it has {sorted(fields) or 'none'}"
        )
    return cls(**options)
