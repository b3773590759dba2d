"""Loading TFDS datasets into uint8 arrays, and the decoded-array cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fippure.data import load_dataset, sources
from fippure.errors import DatasetUnavailableError, InvalidInputError, UnknownNameError


def test_unknown_dataset():
    with pytest.raises(UnknownNameError) as error:
        load_dataset("cifar11", "train")
    message = str(error.value)
    assert "unknown dataset 'cifar11'" in message and "Did you mean 'cifar10'?" in message
    assert "\n" not in message


def test_unknown_split():
    with pytest.raises(InvalidInputError, match="unknown split 'validation'"):
        load_dataset("digits", "validation")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_dataset_without_download(tmp_path, name):
    with pytest.raises(DatasetUnavailableError) as error:
        load_dataset(name, "test", data_dir=tmp_path, download=False)
    message = str(error.value)
    assert "\n" not in message
    assert f"{name} is not prepared in {tmp_path}" in message
    assert "TFDS_DATA_DIR" in message


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def absl_records():
    """What reaches the ``absl`` logger's handlers (TFDS logs through it)."""
    logger, handler = logging.getLogger("absl"), _Records()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_missing_dataset_error_is_the_only_output(tmp_path, absl_records):
    """An empty version folder makes TFDS warn ('has no dataset_info.json'); the warning is
    dropped, so fippure's one-line error is all the user reads."""
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    with pytest.raises(DatasetUnavailableError, match="cifar10 is not prepared"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert absl_records == []


def test_tfds_records_are_released_when_the_dataset_is_found(absl_records):
    with sources._held_absl_records() as held:
        logging.getLogger("absl").warning("a newer version exists")
        assert absl_records == []
    held.replay()
    assert absl_records == ["a newer version exists"]


def test_data_dir_falls_back_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert sources.tfds_data_dir() == str(tmp_path)
    assert sources.tfds_data_dir(tmp_path / "x") == str(tmp_path / "x")
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert sources.tfds_data_dir() is None


def test_a_data_dir_under_home_is_expanded(gtsrb_tfds_dir, tmp_path, monkeypatch):
    # TFDS reads "~/tfds" as a folder named "~": prepared data was reported missing
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sources.tfds_data_dir("~/tfds") == str(tmp_path / "tfds")
    monkeypatch.setenv("TFDS_DATA_DIR", "~/tfds")
    assert sources.tfds_data_dir() == str(tmp_path / "tfds")
    assert len(load_dataset("gtsrb", "test", data_dir="~/tfds", use_cache=False)) == 4
    assert len(load_dataset("gtsrb", "test", use_cache=False)) == 4


def test_cache_is_written_and_reused(gtsrb_tfds_dir, tmp_path, monkeypatch):
    first = load_dataset("gtsrb", "train", data_dir=gtsrb_tfds_dir)
    (cache_file,) = (tmp_path / "cache" / "arrays").glob("gtsrb-1.0.0-train-*.npz")
    assert not list((tmp_path / "cache" / "arrays").glob("gtsrb-1.0.0-test-*.npz"))

    def no_decoding(source):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(sources, "_decode_all", no_decoding)
    again = load_dataset("gtsrb", "train", data_dir=gtsrb_tfds_dir)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("gtsrb", "train", data_dir=gtsrb_tfds_dir, use_cache=False)


def test_corrupt_cache_is_rebuilt(gtsrb_tfds_dir, tmp_path):
    first = load_dataset("gtsrb", "test", data_dir=gtsrb_tfds_dir)
    (cache_file,) = (tmp_path / "cache" / "arrays").glob("gtsrb-1.0.0-test-*.npz")
    cache_file.write_bytes(b"not an npz file")
    rebuilt = load_dataset("gtsrb", "test", data_dir=gtsrb_tfds_dir)
    np.testing.assert_array_equal(rebuilt.images, first.images)
    with np.load(cache_file) as arrays:  # the cache entry was rewritten
        np.testing.assert_array_equal(arrays["labels"], first.labels)
    # a truncated entry (fewer images than the source holds) is rebuilt too
    np.savez(cache_file, images=first.images[:2], labels=first.labels[:2])
    assert len(load_dataset("gtsrb", "test", data_dir=gtsrb_tfds_dir)) == len(first)


def test_the_cache_tells_prepared_directories_apart(gtsrb_tfds_dir, tmp_path):
    """Two preparations of one TFDS version (GTSRB from other archives, say) get their own
    cache entries."""
    import shutil

    load_dataset("gtsrb", "test", data_dir=gtsrb_tfds_dir)
    other = tmp_path / "other_tfds"
    shutil.copytree(gtsrb_tfds_dir, other)
    load_dataset("gtsrb", "test", data_dir=other)
    assert len(list((tmp_path / "cache" / "arrays").glob("gtsrb-1.0.0-test-*.npz"))) == 2


def test_an_image_dataset_refuses_labels_that_are_not_integers():

    from fippure.data.catalog import get_spec
    from fippure.data.sources import ImageDataset

    images = np.zeros((3, 8, 8, 1), np.uint8)
    with pytest.raises(InvalidInputError, match="labels must be integer class indices"):
        ImageDataset(images, np.array([0.5, 1.5, 2.5]), get_spec("digits"), "train")


@pytest.mark.parametrize("name", [None, 10, ["cifar10"]])
def test_a_dataset_name_that_is_not_a_string_is_unknown(name):
    # None once failed inside difflib, and a list was unhashable
    with pytest.raises(UnknownNameError, match="unknown dataset"):
        load_dataset(name, "train")
