"""Arrays a user placed on a device other than the default one, replicated over several, or
split over them: resumed runs put their state back where it was, and estimates do not change.
The multi-device cases run in a subprocess with two CPU devices
(``--xla_force_host_platform_device_count``), which must be set before JAX starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from fippure.checkpoints import placed_like


def test_restored_leaves_come_back_committed_only_where_their_template_was():
    device = jax.devices()[0]
    template = {"weights": jax.device_put(jnp.ones(3), device), "count": jnp.zeros((), jnp.int32)}
    restored = jax.device_put({"weights": jnp.full(3, 2.0), "count": jnp.int32(7)}, device)
    assert restored["count"].committed  # as orbax gives them back
    placed = placed_like(template, restored)
    assert placed["weights"].committed and not placed["count"].committed
    np.testing.assert_array_equal(placed["weights"], restored["weights"])
    assert int(placed["count"]) == 7


_RESUME_ON_ANOTHER_DEVICE = """
import shutil, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from fippure.data.catalog import get_spec
from fippure.data.sources import ImageDataset
from fippure.models import create_model, init_variables
from fippure.purify import Checkpointing, get_defense, make_config
from fippure.training import TrainConfig, train

assert len(jax.devices()) == 2
out = sys.argv[1]
rng = np.random.default_rng(0)
clean = ImageDataset(
    rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40, dtype=np.int32) % 10,
    get_spec("digits"), "clean",
)
model = create_model("small_cnn", 10, width=4)
host = jax.tree_util.tree_map(np.asarray, init_variables(model, jax.random.key(1), (8, 8, 1)))
mesh = Mesh(np.array(jax.devices()), ("batch",))
placements = {"device 1": jax.devices()[1], "replicated": NamedSharding(mesh, PartitionSpec())}

def where(tree):
    return {tuple(sorted(d.id for d in x.devices())) for x in jax.tree_util.tree_leaves(tree)}

class Killed(Exception):
    pass

def kill_after_three(done, _):
    if done == 3:
        raise Killed

for name, placement in placements.items():
    variables = jax.device_put(host, placement)
    expected = where(variables)
    for defense in ("ft",):
        config = make_config(defense, {"steps": 4, "batch_size": 16, "log_every": 1})
        whole, _ = get_defense(defense).purify(model, variables, clean, config, 0, progress=False)
        progress = f"{out}/{defense}_{name}"
        try:
            get_defense(defense).purify(
                model, variables, clean, config, 0, progress=False, observer=kill_after_three,
                observe_every=1, checkpointing=Checkpointing(progress, every=2),
            )
        except Killed:
            pass
        resumed, report = get_defense(defense).purify(
            model, variables, clean, config, 0, progress=False,
            checkpointing=Checkpointing(progress, every=2),
        )
        assert report.resumed_from_step == 2, report.resumed_from_step
        assert where(resumed) == expected, (defense, name, where(resumed))
        jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, whole)
    if name == "replicated":  # training's resume shares the fix; one placement shows it
        continue
    config = TrainConfig(epochs=1, batch_size=8, checkpoint_every=2, eval_every=1)
    whole, _ = train(model, clean, config, variables=variables, progress=False)
    workdir = f"{out}/train_{name}"
    train(model, clean, config, variables=variables, workdir=workdir, progress=False,
          stop_after_steps=2)
    resumed, report = train(model, clean, config, variables=variables, workdir=workdir,
                            progress=False)
    assert report.resumed_from_step == 2 and where(resumed) == expected, name
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, whole)
print("ok")
"""


def test_a_run_on_another_device_or_replicated_resumes_there(tmp_path):
    """Orbax had restored optax's counts and the step counter committed to the default device
    next to weights on device 1: every resumed defense and training run failed with
    'incompatible devices for jitted computation'."""
    _run_on_two_devices(_RESUME_ON_ANOTHER_DEVICE, str(tmp_path))


_TRACE_OF_A_SPLIT_BATCH = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from fippure.curvature import empirical_fisher_diagonal, per_example_fisher_trace
from fippure.models import create_model, init_variables

mesh = Mesh(np.array(jax.devices()), ("batch",))
model = create_model("small_cnn", 10, width=4)
variables = init_variables(model, jax.random.key(1), (8, 8, 1))
rng = np.random.default_rng(0)
x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
y = np.arange(40, dtype=np.int32) % 10

def per_example_loss(params, batch):
    logits = model.apply({**variables, "params": params}, batch[0], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])

exact = sum(float(jnp.sum(d)) for d in jax.tree_util.tree_leaves(
    empirical_fisher_diagonal(per_example_loss, variables["params"], (x, y))))
split = jax.device_put((x, y), NamedSharding(mesh, PartitionSpec("batch")))
trace = per_example_fisher_trace(per_example_loss, variables["params"], split)
assert abs(float(trace) - exact) < 1e-4 * exact, (float(trace), exact)
print("ok")
"""


_DEFENSES_ON_ANOTHER_DEVICE = """
import jax, numpy as np
from fippure.data.catalog import get_spec
from fippure.data.sources import ImageDataset
from fippure.models import create_model, init_variables
from fippure.purify import get_defense, make_config
from fippure.step_inputs import guard_step_transfers

rng = np.random.default_rng(0)
clean = ImageDataset(
    rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40, dtype=np.int32) % 10,
    get_spec("digits"), "clean",
)
model = create_model("small_cnn", 10, width=4)
variables = jax.device_put(
    init_variables(model, jax.random.key(1), (8, 8, 1)), jax.devices()[1]
)
extra = {"ft": {"final_batch_stats": "recompute"}}
for defense in ("ft", "ngf"):
    config = make_config(defense, {"steps": 2, "batch_size": 16, **extra.get(defense, {})})
    with guard_step_transfers("disallow"):
        purified, _ = get_defense(defense).purify(
            model, variables, clean, config, 0, progress=False
        )
    placed = {d.id for x in jax.tree_util.tree_leaves(purified) for d in x.devices()}
    assert placed == {1}, (defense, placed)
print("ok")
"""


def test_a_defense_on_another_device_makes_its_inputs_there():
    """The clean set, keys, step scalars and optimiser counts had been made on device 0 and
    copied to the variables' device 1 at the first step: a second copy of the clean set, and
    a transfer that guard_step_transfers('disallow') refused for every defense."""
    _run_on_two_devices(_DEFENSES_ON_ANOTHER_DEVICE)


def _run_on_two_devices(script: str, *args: str) -> None:
    # the suite's own XLA flags plus two devices, and no share of its compilation cache
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = {
        **{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
        "XLA_FLAGS": flags.strip(),
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_the_per_example_fisher_trace_of_a_batch_split_over_devices_is_exact():
    """XLA's partitioner had given per-example convolution gradients of the split batch, and
    a trace of 5.66 against 9.70 on four devices (the sum of the exact Fisher diagonal)."""
    _run_on_two_devices(_TRACE_OF_A_SPLIT_BATCH)
