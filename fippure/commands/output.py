"""The ``--out`` directory of the read-only commands (``analyze``, ``detect``), checked and made
before any work, so that a bad path fails in one line instead of after minutes of computation."""

from __future__ import annotations

import pathlib

from fippure.errors import InvalidInputError


def prepare_output(out: pathlib.Path | str) -> pathlib.Path:
    """Creates ``out``, refusing a file or a directory that holds a checkpoint or another
    command's run (``metadata.json`` / ``run.json``)."""
    out = pathlib.Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file; give a directory")
    for name in ("metadata.json", "run.json"):
        if (out / name).exists():
            raise InvalidInputError(
                f"--out {out} holds a checkpoint or another run's output ({name}); "
                "choose another directory"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidInputError(f"cannot create --out {out}: {error.strerror}") from None
    return out
