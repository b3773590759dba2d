"""Metrics of backdoor attacks and defenses."""

from fippure.evaluation.metrics import (
    BackdoorMetrics,
    accuracy,
    attack_success_rate,
    defense_effectiveness_rating,
    evaluate_backdoor,
    robust_accuracy,
)

__all__ = [
    "BackdoorMetrics",
    "accuracy",
    "attack_success_rate",
    "defense_effectiveness_rating",
    "evaluate_backdoor",
    "robust_accuracy",
]
