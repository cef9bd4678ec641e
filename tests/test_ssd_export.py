"""ONNX export of the SSD scan: one SSDScan node per SSDScanOp call, run by plain ONNX Runtime and by
onnx's reference evaluator through the node's standard-op function body."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import mq_export
from mq_export.errors import MQExportError
from mq_export.export.onnx import export_module, export_onnx
from mq_export.export.ssd_function import DEFAULT_SSD_CHUNK
from mq_export.ops.selective_scan import SelectiveScanOp
from mq_export.ops.spec import SCAN_DOMAIN, SSDScanSpec
from mq_export.ops.ssd_scan import SSDScanOp, ssd_scan_reference
from mq_export.runtime.ort import session

from .test_mamba2 import GROUPED, ONE_GROUP, save_hf_mamba2

# Lengths that are multiples of neither the function body's chunk nor each other; 70 spans two chunks.
LENGTHS = (13, 70)
assert all(length % DEFAULT_SSD_CHUNK for length in LENGTHS)


def relative_error(actual: np.ndarray, expected: torch.Tensor) -> float:
    return float(np.abs(actual - expected.numpy()).max() / expected.abs().max())


@pytest.mark.parametrize("config", [GROUPED, ONE_GROUP], ids=["ngroups2", "ngroups1-dt-limit"])
def test_hf_mamba2_exports_one_ssdscan_node_per_layer_matching_pytorch(tmp_path, config):
    save_hf_mamba2(tmp_path, 0, **config)
    model = mq_export.load(tmp_path)
    path = tmp_path / "model.onnx"
    proto, info = export_onnx(model, path)
    nodes = [n for n in proto.graph.node if n.domain == SCAN_DOMAIN]
    assert [n.op_type for n in nodes] == ["SSDScan"] * config["num_hidden_layers"] == ["SSDScan"] * info.ssd_scan_nodes
    low, high = config.get("time_step_limit", (0.0, math.inf))
    spec = SSDScanSpec(has_D=True, has_dt_bias=True, dt_min=low, dt_max=high)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.keys() == spec.attributes().keys()
        assert {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()} == pytest.approx(
            spec.attributes())
        assert {a.name: a.type for a in node.attribute if a.name.startswith("dt_m")} == {
            "dt_min": onnx.AttributeProto.FLOAT, "dt_max": onnx.AttributeProto.FLOAT}
    assert [(f.domain, f.name) for f in proto.functions] == [(SCAN_DOMAIN, "SSDScan")]
    # report.json is strict JSON: the unlimited dt_max is null there.
    json.dumps(info.to_dict(), allow_nan=False)
    assert info.ssd_scan_spec["dt_max"] == (None if high == math.inf else pytest.approx(high))

    sess = session(path, scan="function_body")   # plain ONNX Runtime: SSDScan through its function body
    for length in LENGTHS:
        ids = torch.randint(0, config["vocab_size"], (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = model(ids)
        (logits,) = sess.run(None, {"input_ids": ids.numpy()})
        assert relative_error(logits, expected) <= 1e-4


class ScanWithState(nn.Module):
    """One SSD scan with every optional input, initial state in and final state out."""

    def __init__(self, heads: int, headdim: int, dt_limit=(0.01, 2.0)) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(-torch.rand(heads, generator=gen) * 4)
        self.D = nn.Parameter(torch.randn(heads, headdim, generator=gen))
        self.dt_bias = nn.Parameter(torch.randn(heads, generator=gen))
        self.dt_limit = dt_limit
        self.scan = SSDScanOp()

    def scan_kwargs(self, x, dt, B, C, z, state):
        return dict(x=x, dt=dt, A=self.A, B=B, C=C, D=self.D, z=z, dt_bias=self.dt_bias, dt_softplus=True,
                    dt_limit=self.dt_limit, initial_state=state, return_final_state=True)

    def forward(self, x, dt, B, C, z, state):
        return self.scan(**self.scan_kwargs(x, dt, B, C, z, state))


NAMES = ["x", "dt", "B", "C", "z", "state"]
AXES = {"x": {0: "batch", 1: "length"}, "dt": {0: "batch", 1: "length"}, "B": {0: "batch", 1: "length"},
        "C": {0: "batch", 1: "length"}, "z": {0: "batch", 1: "length"}, "state": {0: "batch"},
        "y": {0: "batch", 1: "length"}, "final_state": {0: "batch"}}


def state_inputs(batch, length, heads, headdim, groups, d_state, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, length, heads, headdim), (batch, length, heads), (batch, length, groups, d_state),
              (batch, length, groups, d_state), (batch, length, heads, headdim), (batch, heads, headdim, d_state)]
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def export_scan_with_state(tmp_path, heads=6, headdim=5, groups=3, d_state=7, opset=None):
    module = ScanWithState(heads, headdim)
    path = tmp_path / "scan.onnx"
    proto, info = export_module(module, tuple(state_inputs(2, 9, heads, headdim, groups, d_state, 0)), path,
                                input_names=NAMES, output_names=["y", "final_state"], dynamic_axes=AXES,
                                opset=opset)
    assert info.ssd_scan_nodes == 1
    assert info.ssd_scan_spec["has_initial_state"] == 1 and info.ssd_scan_spec["return_final_state"] == 1
    return module, path


def expected_outputs(module, inputs):
    with torch.no_grad():
        return ssd_scan_reference(**module.scan_kwargs(*inputs))


@pytest.mark.parametrize("opset", [18, 21])
def test_state_in_and_out_in_onnx_runtime(tmp_path, opset):
    module, path = export_scan_with_state(tmp_path, opset=opset)
    sess = session(path, scan="function_body")
    for length in LENGTHS:
        inputs = state_inputs(3, length, 6, 5, 3, 7, seed=length)
        y, state = sess.run(None, dict(zip(NAMES, (t.numpy() for t in inputs))))
        y_ref, state_ref = expected_outputs(module, inputs)
        assert relative_error(y, y_ref) <= 1e-5
        assert relative_error(state, state_ref) <= 1e-5


def test_reference_evaluator_runs_the_function_body(tmp_path):
    from onnx.reference import ReferenceEvaluator

    module, path = export_scan_with_state(tmp_path, heads=4, headdim=3, groups=2, d_state=5)
    inputs = state_inputs(1, 11, 4, 3, 2, 5, seed=1)
    y, state = ReferenceEvaluator(str(path)).run(None, dict(zip(NAMES, (t.numpy() for t in inputs))))
    y_ref, state_ref = expected_outputs(module, inputs)
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(state, state_ref) <= 1e-5


class TwoScans(nn.Module):
    """Mamba-2's SSD scan and, when `selective`, Mamba-1's selective scan in one model (as hybrids have)."""

    def __init__(self, selective: bool, second_dt_limit=(0.0, math.inf)) -> None:
        super().__init__()
        self.ssd = ScanWithState(4, 3)
        self.second = SelectiveScanOp() if selective else SSDScanOp()
        self.second_dt_limit = second_dt_limit

    def forward(self, x, dt, B, C, z, state):
        y, _ = self.ssd(x, dt, B, C, z, state)
        if isinstance(self.second, SelectiveScanOp):
            u = y.flatten(2).transpose(1, 2)                                        # (b, d, l), d = 12
            return self.second(u, u, -torch.ones(12, 5), B.flatten(2).transpose(1, 2)[:, :5],
                               C.flatten(2).transpose(1, 2)[:, :5], delta_softplus=True)
        return self.second(y, dt, self.ssd.A, B, C, dt_softplus=True, dt_limit=self.second_dt_limit)


def test_selective_scan_and_ssd_scan_in_one_export(tmp_path):
    module = TwoScans(selective=True)
    inputs = state_inputs(2, 9, 4, 3, 2, 5, seed=2)
    path = tmp_path / "hybrid.onnx"
    proto, info = export_module(module, tuple(inputs), path, input_names=NAMES, output_names=["out"],
                                dynamic_axes={k: v for k, v in AXES.items() if k in NAMES})
    assert sorted(f.name for f in proto.functions) == ["SSDScan", "SelectiveScan"]
    assert info.scan_nodes == 1 and info.ssd_scan_nodes == 1
    with torch.no_grad():
        expected = module(*inputs)
    (out,) = session(path, scan="function_body").run(None, dict(zip(NAMES, (t.numpy() for t in inputs))))
    assert relative_error(out, expected) <= 1e-5


def test_one_ssdscan_variant_per_export(tmp_path):
    module = TwoScans(selective=False, second_dt_limit=(0.0, 1.0))   # differs from the first scan's limits
    with pytest.raises(MQExportError, match="one export holds one SSDScan variant"):
        export_module(module, tuple(state_inputs(2, 9, 4, 3, 2, 5, seed=2)), tmp_path / "m.onnx",
                      input_names=NAMES, output_names=["out"])
