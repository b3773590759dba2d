"""GTSRB (German Traffic Sign Recognition Benchmark) as a TFDS dataset, built without TensorFlow.

TFDS has no GTSRB builder, so this module registers one under the TFDS name ``gtsrb``. It
reads the official archives from a *manual directory*, either extracted or as the zip files:

* training: ``GTSRB_Final_Training_Images.zip`` or the extracted
  ``GTSRB/Final_Training/Images/000NN/*.ppm`` with one ``GT-000NN.csv`` per class;
* test: ``GTSRB_Final_Test_Images.zip`` or the extracted ``GTSRB/Final_Test/Images/*.ppm``,
  with the labels in ``GT-final_test.csv`` (from ``GTSRB_Final_Test_GT.zip``; the
  ``GT-final_test.test.csv`` inside the image archive has no labels). The extracted CSV may sit
  anywhere under the manual directory.

The CSV files are ``;``-separated with the columns
``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``. Every image is resized as a
whole (choice: the region of interest is not cropped, as in BackdoorBench) to 32x32 with
Pillow's bilinear filter and stored as a uint8 tensor, because TFDS's ``Image`` feature needs
TensorFlow to encode. Records are written to array_record files in a fixed order: training
images sorted by class then file name, test images by file name.

Prepare once, then load through fippure::

    from fippure.data.gtsrb import prepare_gtsrb
    prepare_gtsrb("/path/to/gtsrb_archives", data_dir="/path/to/tfds")
    load_dataset("gtsrb", "train", data_dir="/path/to/tfds")

which is the same as TFDS's own call::

    tfds.data_source("gtsrb", data_dir=..., download=True, download_and_prepare_kwargs={
        "download_config": tfds.download.DownloadConfig(manual_dir=...)})

Without an explicit manual directory TFDS looks in ``<data_dir>/downloads/manual``.
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
import re
import zipfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fippure.errors import DatasetUnavailableError

NUM_CLASSES = 43
IMAGE_SIZE = 32

#: The official archive names (https://benchmark.ini.rub.de/gtsrb_dataset.html).
ARCHIVES = (
    "GTSRB_Final_Training_Images.zip",
    "GTSRB_Final_Test_Images.zip",
    "GTSRB_Final_Test_GT.zip",
)

_TRAIN_CSV = re.compile(r"(?:^|/)Final_Training/Images/(\d{5})/GT-\1\.csv$")
_TEST_CSV = re.compile(r"(?:^|/)GT-final_test\.csv$")
_TEST_IMAGE_DIR = "Final_Test/Images/"

_INSTRUCTIONS = """\
Download the official GTSRB archives from https://benchmark.ini.rub.de/gtsrb_dataset.html
(GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip, GTSRB_Final_Test_GT.zip) and
put them, as zip files or extracted, into the manual directory.
"""


class _Files:
    """A read-only view of the files in a directory tree and in the official zip archives.

    Names are '/'-separated paths relative to the directory or the archive root. Files that
    exist both extracted and inside an archive are read from the extracted copy.
    """

    def __init__(self, root: pathlib.Path):
        self._readers: dict[str, tuple[str, str | pathlib.Path]] = {}
        self._zips: dict[pathlib.Path, zipfile.ZipFile] = {}
        for archive in ARCHIVES:
            path = root / archive
            if path.is_file():
                self._zips[path] = zipfile.ZipFile(path)
                for name in self._zips[path].namelist():
                    if not name.endswith("/"):
                        self._readers[name] = ("zip", path)
        for dirpath, _, filenames in os.walk(root):
            for filename in filenames:
                full = pathlib.Path(dirpath) / filename
                if filename in ARCHIVES and full.parent == root:
                    continue
                self._readers[full.relative_to(root).as_posix()] = ("file", full)

    @property
    def names(self) -> list[str]:
        return sorted(self._readers)

    def __contains__(self, name: str) -> bool:
        return name in self._readers

    def read(self, name: str) -> bytes:
        if name not in self._readers:
            raise DatasetUnavailableError(f"GTSRB file {name} is listed but missing")
        kind, where = self._readers[name]
        if kind == "zip":
            return self._zips[where].read(name)
        return pathlib.Path(where).read_bytes()

    def close(self) -> None:
        for archive in self._zips.values():
            archive.close()


def _read_rows(files: _Files, csv_name: str) -> list[dict[str, str]]:
    """The rows of a ``;``-separated GTSRB annotation file, checked for the needed columns."""
    text = files.read(csv_name).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text), delimiter=";"))
    if rows and not {"Filename", "ClassId"} <= set(rows[0]):
        raise DatasetUnavailableError(
            f"{csv_name} lacks the Filename and ClassId columns (found {sorted(rows[0])})"
        )
    return rows


def _label(row: dict[str, str], csv_name: str) -> int:
    label = int(row["ClassId"])
    if not 0 <= label < NUM_CLASSES:
        raise DatasetUnavailableError(
            f"{csv_name}: ClassId {label} of {row['Filename']} is outside [0, {NUM_CLASSES})"
        )
    return label


def training_examples(files: _Files) -> list[tuple[str, int]]:
    """``(image name, label)`` of every training image, sorted by class then file name.

    Each class folder is read once. A second copy of the training tree (the zip kept beside
    an extraction into a sub-folder) would otherwise store every image twice, and a clean set
    drawn from the split could share images with the attacker's part. Copies that list other
    images are refused.
    """
    copies: dict[str, list[str]] = {}
    for name in files.names:
        match = _TRAIN_CSV.search(name)
        if match:
            copies.setdefault(match.group(1), []).append(name)
    examples = []
    for class_folder in sorted(copies):
        first, *others = copies[class_folder]
        rows = [(row["Filename"], _label(row, first)) for row in _read_rows(files, first)]
        for other in others:
            if [(row["Filename"], _label(row, other)) for row in _read_rows(files, other)] != rows:
                raise DatasetUnavailableError(
                    f"the manual directory holds two different copies of class folder "
                    f"{class_folder}: {first} and {other}; keep one"
                )
        folder = first.rsplit("/", 1)[0]
        examples += [(f"{folder}/{filename}", label) for filename, label in rows]
    if not examples:
        raise DatasetUnavailableError(
            "no GTSRB training annotations (GTSRB/Final_Training/Images/000NN/GT-000NN.csv) "
            "in the manual directory or GTSRB_Final_Training_Images.zip"
        )
    return sorted(examples, key=lambda example: (example[1], example[0]))


def test_examples(files: _Files) -> list[tuple[str, int]]:
    """``(image name, label)`` of every test image, sorted by file name."""
    annotations = [name for name in files.names if _TEST_CSV.search(name)]
    if not annotations:
        raise DatasetUnavailableError(
            "no GTSRB test labels (GT-final_test.csv from GTSRB_Final_Test_GT.zip) in the "
            "manual directory"
        )
    images = {
        name.rsplit("/", 1)[-1]: name
        for name in files.names
        if _TEST_IMAGE_DIR in name and name.lower().endswith(".ppm")
    }
    examples = []
    for row in _read_rows(files, annotations[0]):
        if row["Filename"] not in images:
            raise DatasetUnavailableError(
                f"test image {row['Filename']} listed in {annotations[0]} is missing "
                f"(expected under GTSRB/{_TEST_IMAGE_DIR})"
            )
        examples.append((images[row["Filename"]], _label(row, annotations[0])))
    return sorted(examples, key=lambda example: example[0])


def decode_and_resize(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """An image file's bytes -> uint8 ``(size, size, 3)`` RGB, resized bilinearly."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


class Gtsrb(tfds.core.GeneratorBasedBuilder):
    """GTSRB, 43 classes, images resized to 32x32 (TFDS name ``gtsrb``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official archives, whole images resized to 32x32 bilinearly."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="German Traffic Sign Recognition Benchmark, resized to 32x32.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.BYTES,
                    ),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://benchmark.ini.rub.de/gtsrb_dataset.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = _Files(pathlib.Path(dl_manager.manual_dir))
        return {
            "train": self._generate_examples(files, training_examples(files)),
            "test": self._generate_examples(files, test_examples(files)),
        }

    def _generate_examples(
        self, files: _Files, examples: list[tuple[str, int]]
    ) -> Iterator[tuple[int, dict]]:
        for index, (name, label) in enumerate(examples):
            yield index, {"image": decode_and_resize(files.read(name)), "label": label}


def prepare_gtsrb(
    manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """Builds the TFDS ``gtsrb`` dataset from the official archives.

    Args:
        manual_dir: directory holding the official zip files or their extracted contents.
        data_dir: TFDS data directory to write to; defaults to ``$TFDS_DATA_DIR``, then TFDS's
            default. Pass the same directory to :func:`fippure.data.load_dataset` later.

    Returns:
        The directory of the prepared dataset version.

    Raises:
        DatasetUnavailableError: when the manual directory lacks the archives or they are
            malformed.
    """
    from fippure.data.sources import tfds_data_dir

    manual_dir = pathlib.Path(manual_dir).expanduser().resolve()
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
        raise DatasetUnavailableError(
            f"GTSRB manual directory {manual_dir} is missing or empty; put "
            f"{', '.join(ARCHIVES)} (or their extracted contents) there"
        )
    builder = Gtsrb(data_dir=tfds_data_dir(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return pathlib.Path(os.fspath(builder.data_path))
