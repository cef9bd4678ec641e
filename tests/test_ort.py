"""ONNX Runtime sessions: the registered SelectiveScan kernel wins over the function body and
agrees with it."""
import logging

import numpy as np
import pytest
import torch

from mq_export import ort as mq_ort
from mq_export.errors import MQExportError
from mq_export.export import export_onnx
from mq_export.model import ClassifierConfig, MambaSequenceClassifier, MixerConfig

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("ort") / "model.onnx"
    torch.manual_seed(0)
    model = MambaSequenceClassifier(ClassifierConfig(mixer=MixerConfig(d_model=32), n_layers=2)).eval()
    export_onnx(model, path)
    return model, path


def test_registered_kernel_wins_and_matches_function_body(exported):
    model, path = exported
    x = torch.randn(3, 45, 1)
    body = mq_ort.OrtForward(mq_ort.session(path))(x).numpy()
    before = mq_ort.kernel_calls()
    kernel = mq_ort.OrtForward(mq_ort.session(path, scan_kernel=True))(x).numpy()
    assert mq_ort.kernel_calls() - before == 2          # one call per layer: the kernel ran
    after_body = mq_ort.kernel_calls()
    mq_ort.OrtForward(mq_ort.session(path))(x)
    assert mq_ort.kernel_calls() == after_body          # a plain session never calls it
    np.testing.assert_allclose(kernel, body, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(kernel, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_unreadable_model_is_an_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(MQExportError):
        mq_ort.session(bad)
