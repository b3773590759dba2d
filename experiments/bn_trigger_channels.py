"""Do the stored BatchNorm statistics differ from the clean set's on the channels that carry the
trigger? An analysis of the zoo models behind ``final_batch_stats="transfer"``.

    python experiments/bn_trigger_channels.py badnets blend trojan sig_ratio0.05 wanet \\
        input_aware_density0.15_lr0.001

A zoo model's running statistics were averaged over its poisoned training set, triggered images
included; a defender's D_v is clean. ``transfer`` keeps the former (moved by the defense's
change), ``running`` and ``recompute`` replace them by clean-batch estimates. If the trigger's
channels have a larger stored variance than clean images give them, clean statistics enlarge the
trigger's normalised response, and stored ones damp it.

For each BatchNorm channel of the original model (eval mode, its input before normalisation):

- ``r = var0 / var_v``: stored running variance over D_v's variance (the 500 clean images);
- ``d = (mean_trig - mean_clean) / std_clean``: the trigger's shift of the channel on the test
  split (triggered non-target images against the same images clean), in clean standard
  deviations. This reads the test split: it is an analysis after the fact, not a defense.

Reported per attack: the Spearman rank correlation of ``r`` with ``|d|`` over all channels, the
median ``r`` over the 5% of channels with the largest ``|d|`` and over the rest, and for those
top channels the median trigger response normalised by stored statistics,
``|mean_trig - mean0| / std0``, against the same by D_v's, ``|mean_trig - mean_v| / std_v``.
Writes ``experiments/results/probes/bn_trigger_channels.{json,md}`` with the command, revision,
machine and date.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fippure.data import normalize, to_unit_range

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
OUT = ROOT / "experiments" / "results" / "probes"
TOP_FRACTION = 0.05


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _bn_input_sums(model, spec, variables, batch) -> dict:
    """Per BatchNorm (by module path): the sum and sum of squares of its input over ``batch``
    (eval mode), and the number of rows summed. Module level, so that it compiles once per
    model and batch shape."""
    captured = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            x = args[0].reshape(-1, args[0].shape[-1])
            captured["/".join(module.path)] = (x.sum(0), (x**2).sum(0), x.shape[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, normalize(to_unit_range(batch), spec), train=False)
    return captured


def channel_moments(model, variables, images, spec, chunk: int = 500) -> dict[str, np.ndarray]:
    """Per BatchNorm (by module path): the mean and variance of its input over ``images``
    ([0, 1] or uint8, eval mode), each ``(channels,)``."""
    totals: dict[str, list] = {}
    for start in range(0, len(images), chunk):
        batch = jnp.asarray(images[start : start + chunk])
        for name, (s1, s2, n) in _bn_input_sums(model, spec, variables, batch).items():
            acc = totals.setdefault(name, [0.0, 0.0, 0])
            acc[0] = acc[0] + np.asarray(s1, np.float64)
            acc[1] = acc[1] + np.asarray(s2, np.float64)
            acc[2] += int(n)
    return {name: (s1 / n, s2 / n - (s1 / n) ** 2) for name, (s1, s2, n) in sorted(totals.items())}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of the ranks; the values are floats
    from activations, so ties are negligible)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def analyse(attack: str) -> dict:
    from flax.traverse_util import flatten_dict

    from fippure.zoo import load_backdoored

    bd = load_backdoored(ZOO / attack)
    triggered = bd.triggered
    clean_test = bd.test.images[triggered.source_indices]
    moments = {
        "clean_set": channel_moments(bd.model, bd.variables, bd.clean.images, bd.spec),
        "test_clean": channel_moments(bd.model, bd.variables, clean_test, bd.spec),
        "test_triggered": channel_moments(bd.model, bd.variables, triggered.images, bd.spec),
    }
    stored = flatten_dict(bd.variables["batch_stats"], sep="/")
    ratio, shift, stored_response, clean_response = [], [], [], []
    per_layer = {}
    for name, (mean_v, var_v) in moments["clean_set"].items():
        mean0, var0 = np.asarray(stored[f"{name}/mean"]), np.asarray(stored[f"{name}/var"])
        mean_c, var_c = moments["test_clean"][name]
        mean_t, _ = moments["test_triggered"][name]
        eps = 1e-5
        r = (var0 + eps) / (var_v + eps)
        d = (mean_t - mean_c) / np.sqrt(var_c + eps)
        ratio.append(r)
        shift.append(d)
        stored_response.append(np.abs(mean_t - mean0) / np.sqrt(var0 + eps))
        clean_response.append(np.abs(mean_t - mean_v) / np.sqrt(var_v + eps))
        per_layer[name] = {
            "median_ratio": float(np.median(r)),
            "max_abs_shift": float(np.abs(d).max()),
            "spearman_ratio_abs_shift": spearman(r, np.abs(d)),
        }
    ratio, shift = np.concatenate(ratio), np.abs(np.concatenate(shift))
    stored_response, clean_response = (
        np.concatenate(stored_response),
        np.concatenate(clean_response),
    )
    top = shift >= np.quantile(shift, 1 - TOP_FRACTION)
    return {
        "attack": attack,
        "channels": int(ratio.size),
        "top_channels": int(top.sum()),
        "spearman_ratio_abs_shift": spearman(ratio, shift),
        "median_ratio_top": float(np.median(ratio[top])),
        "median_ratio_rest": float(np.median(ratio[~top])),
        "median_response_top_stored": float(np.median(stored_response[top])),
        "median_response_top_clean_set": float(np.median(clean_response[top])),
        "per_layer": per_layer,
    }


def write_report(results: list[dict], meta: dict) -> str:
    from fippure.provenance import measured_by

    lines = [
        "# Stored BatchNorm statistics against the clean set's, on the trigger's channels",
        "",
        "CIFAR-10 zoo models (PreAct-ResNet-18 w16), original weights, eval mode; every "
        "BatchNorm channel's input. `r` = stored variance / D_v variance (500 clean images). "
        "`|d|` = the trigger's shift of the channel's mean on the test split, in clean standard "
        f"deviations (after the fact). Top = the {TOP_FRACTION:.0%} of channels with the "
        "largest `|d|`. Response = `|mean_trig - mean| / std` with the stored statistics or "
        "with D_v's (median over the top channels).",
        "",
        "| attack | channels | Spearman(r, abs d) | median r, top | median r, rest | "
        "response, stored | response, D_v |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['attack']} | {r['channels']} | {r['spearman_ratio_abs_shift']:.3f} | "
            f"{r['median_ratio_top']:.3f} | {r['median_ratio_rest']:.3f} | "
            f"{r['median_response_top_stored']:.2f} | {r['median_response_top_clean_set']:.2f} |"
        )
    lines += [
        "",
        measured_by(meta),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attacks", nargs="+", help="zoo entries, e.g. badnets blend")
    args = parser.parse_args()
    missing = [a for a in args.attacks if not (ZOO / a / "metadata.json").exists()]
    if missing:
        parser.error(f"no zoo entry for {', '.join(missing)} under {ZOO}")
    from fippure.provenance import provenance

    results = [analyse(attack) for attack in args.attacks]
    meta = provenance()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bn_trigger_channels.json").write_text(
        json.dumps({"results": results, "top_fraction": TOP_FRACTION, **meta}, indent=1)
    )
    text = write_report(results, meta)
    (OUT / "bn_trigger_channels.md").write_text(text)
    print(text)


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "bn_trigger_channels.py")
