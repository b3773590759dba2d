"""Where a result came from: git revision, machine, date and command."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys


def git_revision(short: bool = False) -> str:
    """The current commit of the fippure checkout (``unknown`` outside git), ``+dirty`` if
    the tree has uncommitted changes. Changes under ``experiments/results/`` do not count:
    they are what the scripts write (one report-only run after another would otherwise stamp
    the later ones dirty), not what produced them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
        rev = subprocess.run(
            args, cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)experiments/results",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def machine() -> str:
    """A one-line description of the machine and the JAX backend."""
    import jax

    devices = jax.devices()
    return (
        f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} on {devices[0].platform} "
        f"({len(devices)} x {devices[0].device_kind})"
    )


def code_revision() -> str:
    """The revision of the code this process runs: :func:`git_revision` when fippure was
    imported (a long run's checkout may move on before it writes its results)."""
    return _IMPORTED_REVISION


def provenance() -> dict[str, str]:
    """Command, git revision of the running code, machine and UTC date, for result files.
    If the checkout has moved on since fippure was imported, ``git_revision_at_write`` gives
    the revision at the time of writing as well."""
    now = git_revision()
    return {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "git_revision": _IMPORTED_REVISION,
        **({"git_revision_at_write": now} if now != _IMPORTED_REVISION else {}),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


_IMPORTED_REVISION = git_revision()


def measured_by(meta: dict[str, str]) -> str:
    """The closing line of a results table: "Measured by `COMMAND` at REV on MACHINE, DATE."
    for a :func:`provenance` dict."""
    return (
        f"Measured by `{meta['command']}` at {meta['git_revision']} on {meta['machine']}, "
        f"{meta['date']}."
    )
