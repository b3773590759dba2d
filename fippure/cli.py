"""The ``fippure`` command line.

Each subcommand lives in :mod:`fippure.commands` as a module with ``NAME``, ``HELP``,
``configure(parser)`` and ``run(args)``. Errors fippure raises on purpose, and bad arguments,
end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from fippure.errors import FippureError

#: Subcommand modules, in the order ``fippure --help`` lists them.
COMMANDS = ("train", "attack", "purify", "detect", "analyze", "demo")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each flag's text with its default, where it has one worth saying (not
    ``None``, ``False`` or an empty list, and not already given in the text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unsaid = default is None or default is False or default is argparse.SUPPRESS
        if unsaid or default == [] or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fippure",
        description="Backdoor purification in JAX/Flax: "
        + ", ".join(COMMANDS)
        + " (fippure COMMAND --help for each).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"fippure.commands.{name}")
        command = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.HELP,
            formatter_class=DefaultsFormatter,
        )
        module.configure(command)
        command.set_defaults(handler=module.run)
    return parser


def add_dtype_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """``--dtype``: the model's computation dtype (:data:`fippure.models.ComputeDtype`)."""
    parser.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16"), help=help
    )


def add_no_progress_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: hide the progress bars."""
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_overrides_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): configuration overrides, collected as pairs."""
    parser.add_argument(
        "--set", type=key_value, action="append", default=[], metavar="KEY=VALUE", help=help
    )


def unique_pairs(pairs: list[tuple[str, str]], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs of a repeatable flag as a dict; a key given twice is an error (the
    last value would otherwise win silently)."""
    from fippure.errors import InvalidInputError

    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInputError(f"{flag} {', '.join(repeated)} given more than once")
    return dict(pairs)


def add_clean_subset_flag(parser: argparse.ArgumentParser) -> None:
    """``--clean``: a smaller clean set drawn from a checkpoint's stored one."""
    parser.add_argument(
        "--clean",
        type=clean_size,
        default=None,
        help="use a clean set of this size (count or fraction), drawn from the stored one",
    )


def clean_size(text: str) -> int | float:
    """Parses ``--clean``: a count (``500``, ``10``) or a fraction (``0.01``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    written_as_count = text.strip().lstrip("+").isdigit()  # "1.0" is a fraction, not 1 image
    if written_as_count and value >= 1:
        return int(value)
    if not written_as_count and 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(
        f"expected a count >= 1 (an integer) or a fraction in (0, 1), got {text}"
    )


def _integer_flag(text: str, accepted: Callable[[int], bool], requirement: str) -> int:
    """Parses an integer flag, refused (under the flag's name) unless ``accepted``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not accepted(value):
        raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
    return value


def positive_int(text: str) -> int:
    """Parses a count flag (``--probes 20``): an integer >= 1, so a bad one is refused under its
    flag's name rather than under a config field's."""
    return _integer_flag(text, lambda v: v >= 1, "must be >= 1")


def seed_int(text: str) -> int:
    """Parses a seed flag (``--seed 3``): an integer in [0, 2**32), what JAX and numpy take."""
    return _integer_flag(text, lambda v: 0 <= v < 2**32, "must lie in [0, 2**32)")


def key_value(text: str) -> tuple[str, str]:
    """Parses ``KEY=VALUE`` options (``--set``, ``--option``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def run_script(main: Callable[[], object], name: str) -> None:
    """Runs an experiment script's ``main`` the way ``fippure`` runs a command: a fippure
    error (an unknown attack, a bad override) is one line on stderr and exit status 2."""
    try:
        main()
    except FippureError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FippureError as error:
        print(f"fippure: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fippure: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
