"""Loading datasets into uint8 NHWC numpy arrays.

TFDS datasets are read with ``tfds.data_source`` (array_record files, no TensorFlow). Decoding
50k PNGs takes seconds, so the decoded arrays are cached as ``.npz`` files keyed by dataset,
TFDS version, split and prepared directory, and checked against the source's size when read.
The cache lives in ``$FIPPURE_CACHE_DIR`` (default ``~/.cache/fippure``). TFDS looks for
prepared data in ``data_dir``, then ``$TFDS_DATA_DIR``; when the data is not there it downloads
it (if ``download`` is true and the network allows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pathlib
import tempfile

import numpy as np

from fippure.data.catalog import DatasetSpec, get_spec
from fippure.data.splits import check_label_range
from fippure.errors import DatasetUnavailableError, InvalidInputError

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images and labels of one split, held on the host.

    Attributes:
        images: uint8 array of shape ``(n, h, w, c)``.
        labels: int32 array of shape ``(n,)``.
        spec: the dataset's :class:`DatasetSpec`.
        split: ``"train"`` or ``"test"`` (or a description of a derived subset).
    """

    images: np.ndarray
    labels: np.ndarray
    spec: DatasetSpec
    split: str

    def __post_init__(self):
        if not isinstance(self.images, np.ndarray) or not isinstance(self.labels, np.ndarray):
            raise InvalidInputError(
                "images and labels must be NumPy arrays, got "
                f"{type(self.images).__name__} and {type(self.labels).__name__}"
            )
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise InvalidInputError(
                f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}"
            )
        if self.images.shape[1:] != self.spec.image_shape:
            raise InvalidInputError(
                f"{self.spec.name} images must be {self.spec.image_shape}, "
                f"got {self.images.shape[1:]}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise InvalidInputError(
                f"{len(self.images)} images but labels of shape {self.labels.shape}"
            )
        if not np.issubdtype(np.asarray(self.labels).dtype, np.integer):
            raise InvalidInputError(
                f"labels must be integer class indices, got dtype {np.asarray(self.labels).dtype}"
            )
        check_label_range(self.labels, self.spec.num_classes, f"{self.spec.name} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def subset(self, indices: np.ndarray, split: str | None = None) -> ImageDataset:
        """The examples at ``indices`` (in that order)."""
        indices = np.asarray(indices)
        return ImageDataset(
            self.images[indices], self.labels[indices], self.spec, split or self.split
        )

    def replace(self, **changes) -> ImageDataset:
        return dataclasses.replace(self, **changes)


def cache_dir() -> pathlib.Path:
    """Where decoded arrays are cached (``$FIPPURE_CACHE_DIR`` or ``~/.cache/fippure``)."""
    root = os.environ.get("FIPPURE_CACHE_DIR") or os.path.join("~", ".cache", "fippure")
    return pathlib.Path(root).expanduser() / "arrays"


def tfds_data_dir(data_dir: str | os.PathLike | None = None) -> str | None:
    """The TFDS data directory: the argument, else ``$TFDS_DATA_DIR``, else TFDS's default.

    A leading ``~`` is expanded (TFDS would read it as a folder named ``~``).
    """
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or None
    return None if data_dir is None else os.path.expanduser(os.fspath(data_dir))


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    use_cache: bool = True,
) -> ImageDataset:
    """Loads one split of a dataset as uint8 NHWC arrays.

    Args:
        name: ``cifar10``, ``cifar100``, ``gtsrb`` or ``digits`` (embedded, no download).
        split: ``train`` or ``test``.
        data_dir: TFDS data directory; defaults to ``$TFDS_DATA_DIR``.
        download: let TFDS download and prepare the data when it is missing.
        use_cache: read and write the decoded ``.npz`` cache.

    Returns:
        The :class:`ImageDataset`.

    Raises:
        UnknownNameError: for an unknown dataset.
        DatasetUnavailableError: when the data is not prepared and cannot be downloaded.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise InvalidInputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if spec.tfds_name is None:
        from fippure.data.digits import load_digits

        return load_digits(split)
    source = _open_tfds_source(spec, split, tfds_data_dir(data_dir), download)
    version = str(source.dataset_info.version)
    # Keyed on the prepared directory too: two preparations of one version (GTSRB from other
    # archives, say) must not share an entry.
    prepared = str(pathlib.Path(str(source.dataset_info.data_dir)).resolve())
    where = hashlib.sha1(prepared.encode()).hexdigest()[:10]
    cache_file = cache_dir() / f"{spec.name}-{version}-{split}-{where}.npz"
    if use_cache and cache_file.exists():
        try:
            with np.load(cache_file) as arrays:
                if len(arrays["labels"]) == len(source) == len(arrays["images"]):
                    return ImageDataset(arrays["images"], arrays["labels"], spec, split)
        except (OSError, ValueError, KeyError):
            pass  # a corrupt or truncated cache entry is rebuilt below
    images, labels = _decode_all(source)
    if use_cache:
        _atomic_savez(cache_file, images=images, labels=labels)
    return ImageDataset(images, labels, spec, split)


#: Hosts TFDS downloads from, probed before a download is attempted.
DOWNLOAD_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}


def network_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _open_tfds_source(spec: DatasetSpec, split: str, data_dir: str | None, download: bool):
    import tensorflow_datasets as tfds

    if spec.name == "gtsrb":
        from fippure.data import gtsrb  # noqa: F401  (registers the builder)

    hint = (
        f"{spec.name} is not prepared in "
        f"{data_dir or 'the default TFDS directory'}; set TFDS_DATA_DIR to a prepared TFDS "
        "directory, connect to the internet, or use the embedded '--dataset digits'"
    )
    try:
        with _held_absl_records() as held:
            source = tfds.data_source(
                spec.tfds_name, split=split, data_dir=data_dir, download=False
            )
        held.replay()  # found: its warnings (a newer version exists, say) still matter
        return source
    except Exception as error:  # TFDS raises several types for a missing dataset
        # not found: TFDS's warnings about the empty folder would only precede our one line
        if not download:
            raise DatasetUnavailableError(f"{hint} ({_reason(error)})") from error
    if spec.name == "gtsrb":
        # TFDS cannot download GTSRB; without the archives it would only leave empty folders
        # in the data directory and cut its own instructions short
        root = pathlib.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
        manual = root / "downloads" / "manual"
        if not manual.is_dir() or not any(manual.iterdir()):
            raise DatasetUnavailableError(
                f"gtsrb is not prepared in {root}, and it cannot be downloaded automatically: "
                f"put the official archives ({', '.join(gtsrb.ARCHIVES)}) in {manual}, or call "
                "fippure.data.gtsrb.prepare_gtsrb(archive_dir, data_dir=...)"
            )
    host = DOWNLOAD_HOSTS.get(spec.name)
    if host is not None and not network_reachable(host):
        raise DatasetUnavailableError(f"{hint} (no network: cannot reach {host})")
    try:
        return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=True)
    except Exception as error:  # download or preparation failed
        raise DatasetUnavailableError(f"{hint} ({_reason(error)})") from error


class _HeldRecords(logging.Handler):
    """Keeps the ``absl`` logger's records (TFDS logs through it) until :meth:`replay`."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        logger = logging.getLogger("absl")
        for record in self.records:
            logger.handle(record)
        self.records.clear()


@contextlib.contextmanager
def _held_absl_records():
    """Holds back what TFDS logs inside the block; the caller replays it or drops it."""
    logger = logging.getLogger("absl")
    held = _HeldRecords()
    propagate, handlers = logger.propagate, logger.handlers[:]
    logger.propagate, logger.handlers = False, [held]
    try:
        yield held
    finally:
        logger.propagate, logger.handlers = propagate, handlers


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:200]


def _decode_all(source, chunk: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images, labels = [], []
    for start in range(0, n, chunk):
        records = source.__getitems__(list(range(start, min(n, start + chunk))))
        images.append(np.stack([r["image"] for r in records]).astype(np.uint8))
        labels.append(np.asarray([r["label"] for r in records], dtype=np.int32))
    return np.concatenate(images), np.concatenate(labels)


def _atomic_savez(path: pathlib.Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
        np.savez(handle, **arrays)
    os.replace(handle.name, path)
