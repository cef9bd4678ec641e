"""Bundled evaluation data and the calibration/evaluation split.

The bundled MNIST test set (10,000 images) is split by position: the last `CALIBRATION_SIZE`
images calibrate, the rest evaluate. The two never share an image.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import MQExportError
from .checkpoints import ASSETS

MNIST_DIR = ASSETS / "mnist"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CALIBRATION_SIZE = 1024


@dataclass(frozen=True)
class Split:
    """A named slice of a dataset: inputs (model-ready) and labels."""
    name: str          # e.g. "mnist-test[8976:10000]"
    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _read_idx(path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw[:4], dtype=">u4")[0]
    if header != magic:
        raise MQExportError(f"{path} is not an IDX file (magic {header:#x})")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


def mnist_test() -> tuple[Tensor, Tensor]:
    """All 10,000 test images as normalised pixel sequences (n, 784, 1), and their labels."""
    images = _read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz", 0x0803)
    labels = _read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", 0x0801)
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MNIST_MEAN) / MNIST_STD
    return x.reshape(len(images), -1, 1), torch.from_numpy(labels.astype(np.int64))


def mnist_splits(limit: int | None = None) -> tuple[Split, Split]:
    """(calibration, evaluation): the last 1024 test images, and the first `limit` of the rest."""
    x, y = mnist_test()
    n_eval = len(y) - CALIBRATION_SIZE
    if limit is not None:
        if limit <= 0:
            raise MQExportError(f"--limit must be positive, got {limit}")
        n_eval = min(limit, n_eval)
    calib = Split(f"mnist-test[{len(y) - CALIBRATION_SIZE}:{len(y)}]", x[-CALIBRATION_SIZE:], y[-CALIBRATION_SIZE:])
    evaluation = Split(f"mnist-test[0:{n_eval}]", x[:n_eval], y[:n_eval])
    return calib, evaluation
