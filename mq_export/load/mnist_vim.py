"""The bundled Vision Mamba's data: the bundled MNIST test images as (n, 1, 28, 28) images, cut by
position into three disjoint slices fixed here. `tools/train_vim.py` trains on the training slice;
the pipeline calibrates on the calibration slice and scores the evaluation slice, which neither
training nor calibration sees.
"""
from __future__ import annotations

from ..errors import MQExportError
from .data import Split, mnist_test

# [start, stop) of the 10,000 bundled test images
SLICES = {"evaluation": (0, 2000), "training": (2000, 9488), "calibration": (9488, 10000)}


def mnist_vim_split(which: str, limit: int | None = None) -> Split:
    """One slice as 28×28 images (normalised as the sequence classifier's pixels); `limit` keeps its
    first images."""
    start, stop = SLICES[which]
    if limit is not None:
        if limit <= 0:
            raise MQExportError(f"--limit must be positive, got {limit}")
        stop = min(stop, start + limit)
    pixels, labels = mnist_test()
    return Split(f"mnist-test[{start}:{stop}]", pixels[start:stop].reshape(-1, 1, 28, 28), labels[start:stop])


def mnist_vim_splits(limit: int | None = None) -> tuple[Split, Split]:
    """(calibration, evaluation), `limit` applying to the evaluation slice."""
    return mnist_vim_split("calibration"), mnist_vim_split("evaluation", limit)
