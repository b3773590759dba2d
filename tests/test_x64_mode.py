"""A seed gives the same run with ``jax_enable_x64`` on as off: every random draw pins its dtype
(an integer or coin left to JAX's default dtype is int64/float64 under x64, other bits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_DRAWS = """
import hashlib, json
import jax, jax.numpy as jnp, numpy as np
from fippure.attacks import make_attack
from fippure.curvature import lanczos
from fippure.curvature.probes import rademacher_like
from fippure.data.augment import augment
from fippure.data.catalog import get_spec
from fippure.data.sources import ImageDataset
from fippure.models import create_model, init_variables
from fippure.purify import get_defense, make_config

key = jax.random.key(0)
images = jnp.asarray(np.random.default_rng(0).uniform(size=(6, 32, 32, 3)), jnp.float32)
cifar, digits = get_spec("cifar10"), get_spec("digits")
out = {
    "augment": hashlib.sha256(np.asarray(augment(key, images, 4, True)).tobytes()).hexdigest(),
    "probe": np.asarray(rademacher_like(key, {"w": jnp.zeros(16, jnp.float32)})["w"]).tolist(),
    "trojan": np.asarray(make_attack("trojan").init_state(key, cifar)["pattern"]).tolist(),
    "issba": np.asarray(make_attack("issba").init_state(key, cifar)["code"]).tolist(),
    "lanczos": np.asarray(lanczos(
        lambda v: jnp.arange(1.0, 9.0, dtype=jnp.float32) * v, jnp.zeros(8, jnp.float32), key, 3
    ).alphas).tolist(),
}
rng = np.random.default_rng(0)
clean = ImageDataset(rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
                     np.arange(40, dtype=np.int32) % 10, digits, "clean")
model = create_model("small_cnn", 10, width=4)
variables = init_variables(model, jax.random.key(1), (8, 8, 1))
config = make_config("ft", {"steps": 3, "batch_size": 16})
purified, _ = get_defense("ft").purify(model, variables, clean, config, 0, progress=False)
out["ft"] = [float(jnp.sum(x)) for x in jax.tree_util.tree_leaves(purified)]
out["dtypes"] = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(purified)})
print(json.dumps(out))
"""


def _draws_in_both_modes() -> tuple[dict, dict]:
    """The draws without and with x64, from two subprocesses run side by side (with the
    suite's environment, less its compilation cache)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_DRAWS)],
            env={**env, "JAX_ENABLE_X64": flag, "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ("0", "1")
    ]
    outputs = []
    for run in runs:
        stdout, stderr = run.communicate()
        assert run.returncode == 0, stderr[-3000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outputs[0], outputs[1]


def test_a_seed_draws_the_same_augmentation_probes_triggers_and_defense_run_under_x64():
    """Under x64 the crops, flips, Hutchinson probes, Trojan pattern and ISSBA code had been
    other draws, and a FIP run on the digits BadNets model ended at ASR 0.538 against 0.997
    (FT here: its batches are augmented)."""
    plain, x64 = _draws_in_both_modes()
    for name in ("augment", "probe", "trojan", "issba", "dtypes"):
        assert x64[name] == plain[name], name
    for a, b in zip(x64["lanczos"], plain["lanczos"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    for a, b in zip(x64["ft"], plain["ft"], strict=True):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)
