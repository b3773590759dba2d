"""Writes a tiny GTSRB archive in the official layout, generated with Pillow."""

from __future__ import annotations

import dataclasses
import io
import pathlib
import zipfile

import numpy as np
from PIL import Image

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
TRAIN_CLASSES = (0, 5, 42)
TEST_LABELS = (5, 0, 42, 5)


@dataclasses.dataclass
class TinyGtsrb:
    """What was written, in the order the builder stores it.

    Attributes:
        root: the manual directory.
        train_labels / test_labels: labels in stored order.
        train_colors / test_colors: the (R, G, B) each image is filled with.
    """

    root: pathlib.Path
    train_labels: list[int]
    train_colors: list[tuple[int, int, int]]
    test_labels: list[int]
    test_colors: list[tuple[int, int, int]]


def _image(height: int, width: int, color: tuple[int, int, int]) -> Image.Image:
    # Left half in ``color``, right half black: a resize that swapped axes or mirrored would
    # show in the output.
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = color
    return Image.fromarray(pixels)


def write_tiny_gtsrb(root: pathlib.Path, layout: str = "extracted") -> TinyGtsrb:
    """Writes 3 classes x 2 training images and 4 test images (+ labels) under ``root``.

    ``layout`` is ``extracted`` (the unzipped tree) or ``zip`` (the three official archives).
    Image sizes differ (non-square, odd) so that resizing is exercised.
    """
    files: dict[str, bytes] = {}

    def add_image(name, image):
        buffer = io.BytesIO()
        image.save(buffer, format="PPM")
        files[name] = buffer.getvalue()

    train_labels, train_colors = [], []
    for label in TRAIN_CLASSES:
        folder = f"GTSRB/Final_Training/Images/{label:05d}"
        rows = HEADER
        for i in range(2):
            color = (10 + 5 * label, 100 + i, 200 - label)
            height, width = 41 + 3 * i, 37
            add_image(f"{folder}/00000_{i:05d}.ppm", _image(height, width, color))
            rows += f"00000_{i:05d}.ppm;{width};{height};5;5;{width - 5};{height - 5};{label}\n"
            train_labels.append(label)
            train_colors.append(color)
        files[f"{folder}/GT-{label:05d}.csv"] = rows.encode()
    rows = HEADER
    test_colors = []
    for i, label in enumerate(TEST_LABELS):
        color = (60 + i, 30 * i, 90)
        add_image(f"GTSRB/Final_Test/Images/{i:05d}.ppm", _image(50, 64, color))
        rows += f"{i:05d}.ppm;64;50;5;5;59;45;{label}\n"
        test_colors.append(color)
    # The image archive's own annotation file has no labels; the builder must ignore it.
    files["GTSRB/Final_Test/Images/GT-final_test.test.csv"] = HEADER.replace(
        ";ClassId", ""
    ).encode()
    labels_csv = rows.encode()
    if layout == "extracted":
        for name, data in {**files, "GT-final_test.csv": labels_csv}.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    elif layout == "zip":
        archives = {
            "GTSRB_Final_Training_Images.zip": "GTSRB/Final_Training/",
            "GTSRB_Final_Test_Images.zip": "GTSRB/Final_Test/",
        }
        for archive, prefix in archives.items():
            with zipfile.ZipFile(root / archive, "w") as handle:
                for name, data in files.items():
                    if name.startswith(prefix):
                        handle.writestr(name, data)
        with zipfile.ZipFile(root / "GTSRB_Final_Test_GT.zip", "w") as handle:
            handle.writestr("GT-final_test.csv", labels_csv)
    else:
        raise ValueError(layout)
    return TinyGtsrb(root, train_labels, train_colors, list(TEST_LABELS), test_colors)
