"""Where a result came from: git revision, machine, date and command."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
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


def command_line(argv: list[str] | None = None) -> str:
    """The running command as it can be typed again: quoted (``shlex``), and ``python -m
    fippure ...`` for a run started that way (``sys.argv[0]`` is then ``.../__main__.py``)."""
    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0]) if argv else "python"
    if program == "__main__.py":
        package = os.path.basename(os.path.dirname(os.path.abspath(argv[0])))
        return shlex.join(["python", "-m", package, *argv[1:]])
    return shlex.join([program, *argv[1:]])


def provenance() -> dict[str, str]:
    """Command (as typed again, see :func:`command_line`), the directory it ran in, git
    revision of the running code, machine and UTC date, for result files. If the checkout has
    moved on since fippure was imported, ``git_revision_at_write`` gives the revision at the
    time of writing as well."""
    now = git_revision()
    return {
        "command": command_line(),
        "cwd": os.getcwd(),
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
