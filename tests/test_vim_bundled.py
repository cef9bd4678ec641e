"""The bundled Vision Mamba (`mnist-vim`): its checkpoint, its three data slices, the demo."""
import json

import torch

from mq_export.commands.cli import main
from mq_export.load.bundled import MNIST_VIM, bundled
from mq_export.load.mnist_vim import SLICES, mnist_vim_split


def test_checkpoint_is_hustvl_layout_and_small():
    assert MNIST_VIM.stat().st_size <= 8 * 2 ** 20
    checkpoint = torch.load(MNIST_VIM, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model"} and "layers.5.mixer.conv1d_b.weight" in checkpoint["model"]
    model = bundled("mnist-vim").load()
    cfg = model.cfg
    assert (cfg.mixer.d_model, cfg.depth, cfg.patch_size, cfg.image_size, cfg.length, cfg.readout) == \
        (96, 6, 4, 28, 50, "middle")


def test_slices_are_disjoint_named_in_report_and_large_enough():
    ranges = sorted(SLICES.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == 10_000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))          # disjoint and covering
    assert SLICES["evaluation"][1] - SLICES["evaluation"][0] >= 1500
    report = json.loads((MNIST_VIM.parent / "report.json").read_text())
    assert report["data"] == {name: f"mnist-test[{a}:{b}]" for name, (a, b) in SLICES.items()}
    assert report["fp32_accuracy"]["split"] == report["data"]["evaluation"]
    assert report["fp32_accuracy"]["accuracy"] >= 0.97
    split = mnist_vim_split("calibration")
    assert split.inputs.shape == (512, 1, 28, 28) and split.name == report["data"]["calibration"]


def test_demo_runs_the_pipeline(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--model", "mnist-vim", "--limit", "48", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval"]["split"] == "mnist-test[0:48]" and report["calibration"]["split"] == "mnist-test[9488:10000]"
    assert report["fp32"]["accuracy"] >= 0.9 and report["onnxruntime"]["accuracy"] == report["fp32"]["accuracy"]
    assert report["onnxruntime"]["max_rel_error_vs_pytorch"] < 1e-4 and report["settings"]["onnx"]["scan_nodes"] == 12
