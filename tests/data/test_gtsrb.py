"""The GTSRB TFDS builder on a tiny generated archive (extracted and zipped layouts)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tiny_gtsrb import write_tiny_gtsrb

from fippure.data import load_dataset
from fippure.data.gtsrb import NUM_CLASSES, Gtsrb, _Files, prepare_gtsrb, training_examples
from fippure.errors import DatasetUnavailableError


def _reference(height: int, width: int, color) -> np.ndarray:
    """Pillow's bilinear 32x32 resize of a left-half-coloured image (what the builder stores)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = color
    return np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR))


def _check_split(data, labels, colors, sizes):
    assert data.images.shape == (len(labels), 32, 32, 3)
    assert data.images.dtype == np.uint8
    assert data.labels.dtype == np.int32
    np.testing.assert_array_equal(data.labels, labels)
    for image, color, (height, width) in zip(data.images, colors, sizes, strict=True):
        np.testing.assert_array_equal(image, _reference(height, width, color))
        # Left columns keep the colour, right columns stay black: no transposition or mirror.
        np.testing.assert_array_equal(image[:, :12], np.broadcast_to(color, (32, 12, 3)))
        assert image[:, 20:].max() == 0


@pytest.mark.parametrize("layout", ["extracted", "zip"])
def test_prepare_then_load_through_fippure(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("FIPPURE_CACHE_DIR", str(tmp_path / "cache"))
    manual = tmp_path / "manual"
    manual.mkdir()
    tiny = write_tiny_gtsrb(manual, layout)
    version_dir = prepare_gtsrb(manual, tmp_path / "tfds")
    assert (version_dir / "dataset_info.json").is_file()
    assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
        "gtsrb-test.array_record-00000-of-00001",
        "gtsrb-train.array_record-00000-of-00001",
    ]

    train = load_dataset("gtsrb", "train", data_dir=tmp_path / "tfds", download=False)
    test = load_dataset("gtsrb", "test", data_dir=tmp_path / "tfds", download=False)
    assert train.num_classes == NUM_CLASSES == 43
    # Training images are stored sorted by class, then file name (heights 41 and 44).
    _check_split(train, tiny.train_labels, tiny.train_colors, [(41, 37), (44, 37)] * 3)
    _check_split(test, tiny.test_labels, tiny.test_colors, [(50, 64)] * 4)


def test_tfds_data_source_with_manual_dir(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    tiny = write_tiny_gtsrb(manual, "zip")
    source = tfds.data_source(
        "gtsrb",
        split="test",
        data_dir=tmp_path / "tfds",
        download=True,
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(manual_dir=manual)
        },
    )
    assert len(source) == 4
    assert [int(source[i]["label"]) for i in range(4)] == tiny.test_labels
    assert source[0]["image"].shape == (32, 32, 3)
    assert source.dataset_info.features["label"].num_classes == 43


def test_load_dataset_prepares_from_default_manual_dir(tmp_path, monkeypatch):
    """Archives in ``<data_dir>/downloads/manual`` are found without further arguments."""
    monkeypatch.setenv("FIPPURE_CACHE_DIR", str(tmp_path / "cache"))
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    tiny = write_tiny_gtsrb(manual, "zip")
    train = load_dataset("gtsrb", "train", data_dir=tmp_path / "tfds", download=True)
    np.testing.assert_array_equal(train.labels, tiny.train_labels)


def test_builder_metadata():
    builder = Gtsrb(data_dir="/nonexistent")
    assert builder.name == "gtsrb"
    assert builder.info.disable_shuffling
    assert builder.info.features["image"].shape == (32, 32, 3)
    assert builder.info.features["image"].np_dtype == np.uint8
    assert builder.info.supervised_keys == ("image", "label")


def test_missing_or_empty_manual_dir(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="missing or empty"):
        prepare_gtsrb(tmp_path / "absent", tmp_path / "tfds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetUnavailableError, match="missing or empty"):
        prepare_gtsrb(tmp_path / "empty", tmp_path / "tfds")


def test_a_second_copy_of_the_training_tree_is_read_once(tmp_path):
    # the zip kept beside its extraction into a sub-folder: every image was stored twice, so
    # a clean set could share images with the attacker's part
    manual = tmp_path / "manual"
    manual.mkdir()
    tiny = write_tiny_gtsrb(manual, "zip")
    with zipfile.ZipFile(manual / "GTSRB_Final_Training_Images.zip") as archive:
        archive.extractall(manual / "GTSRB_Final_Training_Images")
    files = _Files(manual)
    try:
        examples = training_examples(files)
    finally:
        files.close()
    assert [label for _, label in examples] == tiny.train_labels
    assert len({name.split("Final_Training/")[1] for name, _ in examples}) == len(examples)


def test_copies_of_a_class_folder_that_differ_are_refused(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_tiny_gtsrb(manual, "zip")
    with zipfile.ZipFile(manual / "GTSRB_Final_Training_Images.zip") as archive:
        archive.extractall(manual / "copy")
    partial = manual / "copy/GTSRB/Final_Training/Images/00005/GT-00005.csv"
    partial.write_text("".join(partial.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(DatasetUnavailableError, match="two different copies of class folder 00005"):
        prepare_gtsrb(manual, tmp_path / "tfds")


def test_missing_test_labels(tiny_gtsrb, tmp_path):
    (tiny_gtsrb.root / "GT-final_test.csv").unlink()  # only the label-less .test.csv remains
    with pytest.raises(DatasetUnavailableError, match="GT-final_test.csv"):
        prepare_gtsrb(tiny_gtsrb.root, tmp_path / "tfds")


def test_missing_training_annotations(tiny_gtsrb, tmp_path):
    for csv_file in tiny_gtsrb.root.glob("GTSRB/Final_Training/Images/*/GT-*.csv"):
        csv_file.unlink()
    with pytest.raises(DatasetUnavailableError, match="training annotations"):
        prepare_gtsrb(tiny_gtsrb.root, tmp_path / "tfds")


def test_listed_image_missing(tiny_gtsrb, tmp_path):
    (tiny_gtsrb.root / "GTSRB/Final_Training/Images/00005/00000_00001.ppm").unlink()
    with pytest.raises(DatasetUnavailableError, match="00005/00000_00001.ppm"):
        prepare_gtsrb(tiny_gtsrb.root, tmp_path / "tfds")


def test_label_out_of_range(tiny_gtsrb, tmp_path):
    labels = tiny_gtsrb.root / "GT-final_test.csv"
    labels.write_text(labels.read_text().replace(";42\n", ";43\n"))
    with pytest.raises(DatasetUnavailableError, match="ClassId 43"):
        prepare_gtsrb(tiny_gtsrb.root, tmp_path / "tfds")


def test_not_prepared_without_download(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="gtsrb is not prepared"):
        load_dataset("gtsrb", "train", data_dir=tmp_path / "tfds", download=False)


def test_a_download_without_the_archives_explains_the_manual_step_and_writes_nothing(tmp_path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    with pytest.raises(DatasetUnavailableError, match="cannot be downloaded automatically") as e:
        load_dataset("gtsrb", "train", data_dir=data_dir, download=True)
    assert str(data_dir / "downloads" / "manual") in str(e.value)
    assert list(data_dir.iterdir()) == []  # no empty folders left behind
