"""FIP and Fast FIP step times at two revisions, alternating on the same machine.

    python experiments/fast_fip_speed_ab.py 6b3545e [--rounds 2]

Checks whether a change in the measured speed-up (``fast_fip_speed.md``) comes from the code
or from the machine: each round times FIP and Fast FIP (``fast_fip_speed.time_run``: defaults,
gradients clipped at 10, 21 steps, zoo BadNets) in a temporary worktree of the given revision,
then in this checkout, each in a fresh process. Writes
``experiments/results/probes/fast_fip_speed_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "probes" / "fast_fip_speed_ab.json"
TIMER = """
import json, sys
sys.path.insert(0, "experiments")
import fast_fip_speed as f
from fippure.zoo import load_backdoored
backdoored = load_backdoored(str(f.ZOO / "badnets"))
print("RESULT", json.dumps({v: f.time_run(backdoored, v, 21, 0)["step_time_s"]
                            for v in ("fip", "fast_fip")}))
"""


def time_tree(tree: pathlib.Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", TIMER], cwd=tree, env=env, capture_output=True, text=True
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"timing in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the other revision, e.g. 6b3545e")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from fippure.provenance import provenance

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        other = pathlib.Path(scratch) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(other), args.revision],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            for i in range(args.rounds):
                for name, tree in ((args.revision, other), ("this checkout", ROOT)):
                    times = time_tree(tree)
                    ratio = times["fip"] / times["fast_fip"]
                    print(f"round {i} {name}: {times} -> {ratio:.2f}x", flush=True)
                    runs.append({"round": i, "revision": name, **times, "ratio": ratio})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps({"runs": runs, "other_revision": args.revision, **provenance()}, indent=1)
    )


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "fast_fip_speed_ab.py")
