"""Defenses: pure functions ``purify(model, variables, clean_set, config, key)``.

See :mod:`fippure.purify.registry` for the list and :mod:`fippure.purify.runner` for running
one on a checkpoint and evaluating it. :func:`recompute_batch_stats` re-estimates a purified
model's BatchNorm statistics on the clean set (what ``final_batch_stats="recompute"`` does in a
defense's config). Every defense also takes ``checkpointing=Checkpointing(directory)``: it
saves its progress there and, killed and called again the same way, resumes from it.
"""

from fippure.purify.batch_stats import recompute_batch_stats
from fippure.purify.common import PurifyReport
from fippure.purify.registry import DEFENSES, Defense, get_defense, make_config
from fippure.purify.resume import Checkpointing

__all__ = [
    "Checkpointing",
    "DEFENSES",
    "Defense",
    "PurifyReport",
    "get_defense",
    "make_config",
    "recompute_batch_stats",
]
