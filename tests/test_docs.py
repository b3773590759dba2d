"""The documentation stays true to the code: every path it names exists, every ``fippure.x``
name it cites resolves, its Python examples compile and import what exists, and every
``fippure`` command line it shows parses with the CLI and names valid attacks, defenses and
``--set``/``--option`` keys. Nothing here downloads data or trains a model.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import shlex

import pytest

from fippure.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "zoo/README.md", "CONTRIBUTING.md"]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
REPOSITORY_PATH = re.compile(
    r"(?<![\w/.])((?:experiments|fippure|zoo|tests|notebooks)/[\w./-]*\w)(?![\w<])"
)
DOTTED_NAME = re.compile(r"`(fippure(?:\.\w+)+)`")


def _text(document: str) -> str:
    return (ROOT / document).read_text()


def _blocks(document: str, language: str) -> list[str]:
    blocks = []
    for match in FENCE.finditer(_text(document)):
        indent, lang, body = match.groups()
        if lang == language:
            blocks.append("\n".join(line[len(indent) :] for line in body.splitlines()))
    return blocks


def _command_lines(document: str) -> list[str]:
    """The ``fippure ...`` lines of the document's bash blocks, continuations joined."""
    lines = []
    for block in _blocks(document, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("fippure "):
                lines.append(line)
    return lines


def _resolve(dotted: str):
    """The object ``fippure.a.b.c`` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute)
        return value
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_repository_path_a_document_names_exists(document):
    named = sorted(set(REPOSITORY_PATH.findall(_text(document))))
    missing = [path for path in named if not (ROOT / path).exists()]
    assert named
    assert not missing, f"{document} names paths that do not exist: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_fippure_name_a_document_cites_resolves(document):
    unresolved = []
    for dotted in sorted(set(DOTTED_NAME.findall(_text(document)))):
        try:
            _resolve(dotted)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{dotted} ({error})")
    assert not unresolved, f"{document} cites names that do not exist: {unresolved}"


def test_readme_python_examples_compile_and_import_what_exists():
    blocks = _blocks("README.md", "python")
    assert len(blocks) >= 4
    for block in blocks:
        tree = ast.parse(block)  # a syntax error fails here
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("fippure"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def _check_command(line: str) -> None:
    from fippure.attacks import make_attack, validate_attack_args
    from fippure.data.catalog import get_spec
    from fippure.models.registry import create_model
    from fippure.purify import make_config

    argv = shlex.split(line)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        raise AssertionError(f"the CLI refuses the documented command: {line}") from exit
    if getattr(args, "dataset", None) is not None and args.command != "demo":
        get_spec(args.dataset)
    if args.command in ("train", "attack"):
        create_model(args.model, get_spec(args.dataset).num_classes, width=args.width)
    if args.command == "attack":
        attack = make_attack(args.attack, **dict(args.option))
        validate_attack_args(
            ratio=args.ratio,
            target=args.target,
            mode=args.mode,
            num_classes=get_spec(args.dataset).num_classes,
            clean_label=attack.clean_label,
        )
    if args.command == "purify":
        make_config(args.defense, dict(args.set))
    if args.command == "demo":
        make_config("fip", dict(args.set))
    for name in ("checkpoint", "checkpoints"):
        paths = getattr(args, name, None) or []
        for path in [paths] if isinstance(paths, str) else paths:
            if path.startswith("zoo/"):
                assert (ROOT / path).exists(), f"{line}: no {path}"


@pytest.mark.parametrize("document", ["README.md", "zoo/README.md"])
def test_documented_command_lines_parse_and_name_valid_options(document):
    lines = _command_lines(document)
    if document == "README.md":
        commands = {shlex.split(line)[1] for line in lines}
        assert {"demo", "train", "attack", "purify", "analyze", "detect"} <= commands
    for line in lines:
        _check_command(line)


def test_a_stale_option_in_a_documented_command_is_caught():
    with pytest.raises(Exception, match="eta_G"):
        _check_command(
            "fippure purify --checkpoint zoo/cifar10/preact_resnet18_w16/badnets "
            "--defense fip --set eta_G=1"
        )
    with pytest.raises(AssertionError, match="refuses"):
        _check_command("fippure attack --dataset cifar10 --attack badnets --ratios 0.1 --out x")
