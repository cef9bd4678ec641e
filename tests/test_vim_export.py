"""Vision Mamba export: a hustvl-layout checkpoint through `mq-export export` (run_export), ONNX
Runtime against the test-only hustvl forward; --image-size; build-engine profiles for images."""
import argparse
import json

import numpy as np
import onnx
import pytest
import torch

from mq_export.commands.cli import main
from mq_export.commands.export import run_export
from mq_export.errors import MQExportError
from mq_export.load.checkpoints import BUNDLED_CLASSIFIER, load_checkpoint
from mq_export.runtime import ort as mq_ort
from mq_export.runtime.engine import equivalent_commands, input_shapes, load_onnx, parse_profile

from .test_vim import hustvl_forward, vim_t_state


@pytest.fixture(scope="module")
def hustvl_checkpoint(tmp_path_factory):
    """A training checkpoint as hustvl's main.py writes it: weights under "model", its arguments too.
    Vim-T's keys and shapes; one layer and 64-pixel images (4×4 patches) keep it quick."""
    directory = tmp_path_factory.mktemp("vim")
    state = vim_t_state(depth=1, image_size=64)
    path = directory / "vim_t_midclstok.pth"
    torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(model="vim_tiny_patch16_224_bimambav2")}, path)
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(images, directory / "images.pt")
    return path, state, images


@pytest.fixture(scope="module")
def exported(hustvl_checkpoint, tmp_path_factory):
    """`mq-export export` of the checkpoint (FP32; the calibration file only stands in for evaluation
    images, as for any classifier without bundled data): (output directory, report.json)."""
    path, _, _ = hustvl_checkpoint
    out = tmp_path_factory.mktemp("vim-export") / "out"
    report = run_export(path, out, calib=path.with_name("images.pt"), quiet=True)
    return out, json.loads(report.to_json())


def test_export_matches_hustvl_forward(hustvl_checkpoint, exported):
    _, state, images = hustvl_checkpoint
    out, report = exported
    onnx_settings = report["settings"]["onnx"]
    assert onnx_settings["scan_nodes"] == 2 and onnx_settings["reverse_scan_nodes"] == 1
    assert report["onnxruntime"]["max_rel_error_vs_pytorch"] < 1e-4
    proto = onnx.load(out / "model.onnx")
    assert [i.name for i in proto.graph.input] == ["images"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    reverse = [a.i for n in proto.graph.node if n.op_type == "SelectiveScan" for a in n.attribute if a.name == "reverse"]
    assert sorted(reverse) == [0, 1]
    sess = mq_ort.session(out / "model.onnx")
    for batch in (1, 6):       # dynamic batch
        logits = sess.run(None, {"images": images[:batch].numpy()})[0]
        ref = hustvl_forward(state, images[:batch], depth=1, patch=16).numpy()
        assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()


def test_image_size_option(hustvl_checkpoint, tmp_path, capsys):
    path, _, _ = hustvl_checkpoint
    # 4×4 patches of 16 pixels also tile 40-pixel images with overlapping patches (stride 8)
    model = load_checkpoint(path, image_size=40)
    assert (model.cfg.image_size, model.cfg.stride) == (40, 8)
    assert model(torch.zeros(1, 3, 40, 40)).shape == (1, 1000)
    with pytest.raises(MQExportError, match="makes no 4×4 grid"):
        load_checkpoint(path, image_size=50)
    # the CLI passes --image-size to the loader, which refuses it for other checkpoints
    assert main(["export", str(BUNDLED_CLASSIFIER), "-o", str(tmp_path / "out"), "--image-size", "28"]) == 2
    assert "an image size applies to Vision Mamba checkpoints" in capsys.readouterr().err


def test_build_engine_profile_for_image_inputs(exported):
    """Only the batch is dynamic; trtexec and polygraphy get whole image shapes."""
    onnx_path = exported[0] / "model.onnx"
    commands = equivalent_commands(onnx_path, "plugin.so", "vim.engine", profile=parse_profile("batch=1:8:32"))
    assert "--minShapes=images:1x3x64x64 --optShapes=images:8x3x64x64 --maxShapes=images:32x3x64x64" \
        in commands["trtexec_build"]
    assert "images:[32,3,64,64]" in commands["polygraphy_build"]
    with pytest.raises(MQExportError, match="dynamic dimension 'batch': give its range"):
        input_shapes(load_onnx(onnx_path), {})
