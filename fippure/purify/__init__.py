"""Defenses: pure functions ``purify(model, variables, clean_set, config, key)``.

See :mod:`fippure.purify.registry` for the list and :mod:`fippure.purify.runner` for running
one on a checkpoint and evaluating it. :func:`recompute_batch_stats` re-estimates a purified
model's BatchNorm statistics on the clean set (what ``final_batch_stats="recompute"`` does in a
defense's config). Every defense also takes ``checkpointing=Checkpointing(directory)``: it
saves its progress there and, killed and called again the same way, resumes from it.
:mod:`fippure.purify.trigger_inversion` synthesizes a trigger from the clean set (Neural
Cleanse), for choices a defender must make without test data, and
:func:`purify_with_clean_stop` runs any defense with its step count chosen that way.
"""

from fippure.purify.batch_stats import recompute_batch_stats
from fippure.purify.clean_stop import (
    CleanStopConfig,
    choose_stop,
    make_clean_stop_config,
    purify_with_clean_stop,
)
from fippure.purify.common import PurifyReport, StopEarly
from fippure.purify.registry import DEFENSES, Defense, get_defense, make_config
from fippure.purify.resume import Checkpointing
from fippure.purify.trigger_inversion import (
    InversionConfig,
    InvertedTrigger,
    TriggerScan,
    invert_trigger,
    scan_classes,
    synthesized_asr,
)

__all__ = [
    "Checkpointing",
    "CleanStopConfig",
    "DEFENSES",
    "Defense",
    "InversionConfig",
    "InvertedTrigger",
    "PurifyReport",
    "StopEarly",
    "TriggerScan",
    "choose_stop",
    "get_defense",
    "invert_trigger",
    "make_clean_stop_config",
    "make_config",
    "purify_with_clean_stop",
    "recompute_batch_stats",
    "scan_classes",
    "synthesized_asr",
]
