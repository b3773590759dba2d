"""Backdoor attacks generated in code: triggers, poisoning plans, triggered test sets."""

from fippure.attacks.base import Attack, AttackContext, State, apply_trigger
from fippure.attacks.poisoning import (
    MODES,
    PoisonPlan,
    attack_targets,
    make_poison_plan,
    validate_attack_args,
)
from fippure.attacks.registry import ATTACKS, make_attack
from fippure.attacks.triggered import TriggeredSet, triggered_test_set

__all__ = [
    "ATTACKS",
    "MODES",
    "Attack",
    "AttackContext",
    "PoisonPlan",
    "State",
    "TriggeredSet",
    "apply_trigger",
    "attack_targets",
    "make_attack",
    "make_poison_plan",
    "triggered_test_set",
    "validate_attack_args",
]
