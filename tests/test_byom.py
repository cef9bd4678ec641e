"""Bring your own model: a user's module with a mamba-ssm-style Mamba in it, converted, calibrated,
quantized and exported through the public API (README "Bring your own model" runs as
`kws_example` here, with `ReferenceMamba` standing in for `mamba_ssm.Mamba`)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mq_export as mq
from mq_export.models.mamba import MambaMixer
from mq_export.quant.transforms import apply_transforms
from mq_export.runtime.ort import session


class ReferenceMamba(nn.Module):
    """mamba-ssm's `Mamba` parameter names and initialisation, with its forward written out
    step by step (nothing from mq_export), so the conversion is checked against the real math."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        d_inner, self.dt_rank, self.d_state = expand * d_model, math.ceil(d_model / 16), d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # softplus⁻¹(dt), as mamba-ssm
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def selection(self, dt, B, C):
        return dt, B, C

    def forward(self, hidden):
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)
        dt, B, C = self.selection(*self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1))
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log)
        h = x.new_zeros(x.shape[0], x.shape[2], self.d_state)
        ys = []
        for t in range(length):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1))
        y = torch.stack(ys, dim=1) + x * self.D
        return self.out_proj(y * F.silu(z))


README = Path(__file__).resolve().parents[1] / "README.md"


def kws_example(Mamba, workdir):
    """Runs the code block of README's "Bring your own model" section as written, with `Mamba`
    standing in for mamba_ssm's and the ONNX file written into `workdir`."""
    section = README.read_text().split("## Bring your own model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from mamba_ssm import Mamba" in code and '"kws.onnx"' in code
    code = code.replace("from mamba_ssm import Mamba", "").replace('"kws.onnx"', repr(str(workdir / "kws.onnx")))
    namespace = {"Mamba": Mamba, "__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    return tuple(namespace[name] for name in ("model", "converted", "stats", "qmodel", "settings"))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("byom")
    return workdir, *kws_example(ReferenceMamba, workdir)


def test_readme_example_onnx_runtime_equals_fake_quant(example):
    workdir, model, converted, stats, qmodel, settings = example
    assert converted == ["mamba"] and isinstance(model.mamba, MambaMixer)
    assert settings["method"] == "rtn" and settings["w_bits"] == settings["a_bits"] == 8
    # Inside the mixer every Linear input is quantized; the user's own Linears get int8 weights.
    assert {"mamba.sites.in_proj", "mamba.sites.out_proj", "mamba.sites.scan_C"} <= set(settings["quantized_activation_sites"])
    assert {"embed", "head", "mamba.in_proj"} <= set(settings["quantized_weights"])
    mels = torch.randn(3, 61, 40, generator=torch.Generator().manual_seed(1))   # other batch and length
    with torch.no_grad():
        fake_quant = qmodel(mels)
    nodes = [node.op_type for node in onnx.load(str(workdir / "kws.onnx")).graph.node]
    assert nodes.count("QuantizeLinear") == 6 and nodes.count("SelectiveScan") == 1
    sess = session(workdir / "kws.onnx")
    assert [i.name for i in sess.get_inputs()] == ["mels"] and [o.name for o in sess.get_outputs()] == ["logits"]
    ort_logits = torch.from_numpy(sess.run(["logits"], {"mels": mels.numpy()})[0])
    assert float((ort_logits - fake_quant).abs().max() / fake_quant.abs().max()) < 1e-3
    assert torch.equal(ort_logits.argmax(-1), fake_quant.argmax(-1))


def test_conversion_keeps_the_function_and_touches_nothing_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), ReferenceMamba(16), nn.Linear(16, 12)).eval()
    original, embed, head = copy.deepcopy(model), model[0], model[2]
    x = torch.randn(2, 23, 40)
    assert mq.convert_mamba_mixers(model) == ["1"]
    assert isinstance(model[1], MambaMixer) and model[0] is embed and model[2] is head
    assert model[1].cfg.d_model == 16 and model[1].cfg.d_state == 16 and model[1].cfg.rank == 1
    assert torch.equal(model[0].weight, original[0].weight) and torch.equal(model[2].weight, original[2].weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=1e-5)
    with pytest.raises(mq.MQExportError, match="no Mamba mixer to convert"):
        mq.convert_mamba_mixers(model)                     # already converted


class NormalisedMamba(ReferenceMamba):
    """Mamba's names, FalconMamba's computation (RMS-normalised dt, B, C): not a Mamba-1 mixer."""

    def selection(self, dt, B, C):
        return tuple(v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) for v in (dt, B, C))


def test_conversion_refuses_a_different_computation():
    model = nn.Sequential(NormalisedMamba(16))
    with pytest.raises(mq.MQExportError, match="parameter names but not its computation"):
        mq.convert_mamba_mixers(model)
    assert isinstance(model[0], NormalisedMamba)


def test_forward_loop_records_what_the_iterable_gives(example):
    _, model, _, stats, _, _ = example
    batches = [stats.inputs[i:i + 16] for i in range(0, len(stats.inputs), 16)]
    looped = mq.calibrate(model, forward_loop=lambda m: [m(b) for b in batches])
    assert torch.equal(looped.inputs, stats.inputs)
    assert looped.sites.keys() == stats.sites.keys()
    for name, site in stats.sites.items():
        assert torch.equal(looped.sites[name].absmax, site.absmax), name


def test_calibration_input_errors(example):
    _, model, _, _, _, _ = example
    with pytest.raises(mq.MQExportError, match="several shapes"):
        mq.calibrate(model, [torch.randn(2, 10, 40), torch.randn(2, 12, 40)])
    with pytest.raises(mq.MQExportError, match="one input tensor per call"):
        mq.calibrate(model, forward_loop=lambda m: m(mels=torch.randn(2, 10, 40)))
    with pytest.raises(mq.MQExportError, match="data or a forward_loop"):
        mq.calibrate(model)


def test_mixer_transforms_preserve_the_function(example):
    """mambaquant's transforms inside the mixer (dt path, B/C state smoothing, S-SiLU gate and the
    online out_proj rotation) need no knowledge of the model around it."""
    _, model, _, stats, _, _ = example
    transformed, info = apply_transforms(model, stats, mq.QuantConfig(method="mambaquant").transforms())
    assert sorted(s.split(" ")[0] for s in info["online"]) == ["mamba.gate_scale", "mamba.out_proj_input_rotation"]
    assert not torch.equal(transformed.mamba.x_proj.weight, model.mamba.x_proj.weight)
    assert torch.equal(transformed.embed.weight, model.embed.weight)   # outside the mixer: untouched
    x = stats.inputs[:8]
    with torch.no_grad():
        torch.testing.assert_close(transformed(x), model(x), rtol=1e-4, atol=1e-5)
    qmodel, settings = mq.quantize(model, stats, method="mambaquant")
    assert settings["online"] == info["online"]
    with torch.no_grad():
        assert float((qmodel(x) - model(x)).abs().max() / model(x).abs().max()) < 1e-2


def test_export_onnx_points_a_custom_model_to_export_module(example, tmp_path):
    _, model, _, _, _, _ = example
    with pytest.raises(mq.MQExportError, match="export it with export_module"):
        mq.export_onnx(model, tmp_path / "model.onnx")
