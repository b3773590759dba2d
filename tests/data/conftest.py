"""Fixtures of the data tests: a tiny GTSRB archive, extracted and prepared."""

from __future__ import annotations

import pathlib

import pytest
from tiny_gtsrb import TinyGtsrb, write_tiny_gtsrb


@pytest.fixture
def tiny_gtsrb(tmp_path) -> TinyGtsrb:
    """The extracted tiny archive in ``tmp_path/manual``."""
    root = tmp_path / "manual"
    root.mkdir()
    return write_tiny_gtsrb(root, "extracted")


@pytest.fixture
def gtsrb_tfds_dir(tmp_path, tiny_gtsrb, monkeypatch) -> pathlib.Path:
    """A TFDS data directory with the tiny GTSRB prepared, and a private array cache."""
    from fippure.data.gtsrb import prepare_gtsrb

    monkeypatch.setenv("FIPPURE_CACHE_DIR", str(tmp_path / "cache"))
    data_dir = tmp_path / "tfds"
    prepare_gtsrb(tiny_gtsrb.root, data_dir)
    return data_dir
