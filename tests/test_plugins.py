"""plugins/: CPU models of the CUDA kernels' chunked scan algorithms (SelectiveScan, SSDScan), the
CUDA kernel library, the TensorRT plugin harness for both ops.

Without nvcc/cmake the build tests skip; without TensorRT headers (env MQ_TRT_INCLUDE: a directory
holding NvInferRuntime.h) the harness tests skip; without a CUDA device the kernel comparisons skip.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mq_export.ops import cuda_kernel as kernels
from mq_export.errors import MQExportError
from mq_export.ops.spec import (SCAN_OP_TYPE, SCAN_PLUGIN_NAMESPACE, SCAN_PLUGIN_VERSION, SSD_OP_TYPE,
                                SSD_PLUGIN_VERSION, SSDScanSpec, SelectiveScanSpec)
from mq_export.ops.plugin_spec import onnx_node_description, spec_node_description
from mq_export.ops.selective_scan import selective_scan_reference
from mq_export.ops.ssd_scan import ssd_scan_reference

REPO = Path(__file__).resolve().parents[1]
TRT_INCLUDE = os.environ.get("MQ_TRT_INCLUDE")
CUDA = torch.cuda.is_available()

KERNELS = REPO / "plugins" / "kernels"


def kernel_constant(source: str, name: str) -> int:
    """A `constexpr int` of a CUDA kernel source, so the CPU models below use the kernels' work split."""
    match = re.search(rf"constexpr int {name} = (\d+);", (KERNELS / source).read_text())
    assert match, f"{name} is not a constexpr int of {source}"
    return int(match.group(1))


LANES = kernel_constant("selective_scan.cu", "kWarpSize")
ITEMS_PER_LANE = kernel_constant("selective_scan.cu", "kItemsPerLane")
CHUNK = LANES * ITEMS_PER_LANE
# ssd_scan.cu: a chunk is one warp wide (`constexpr int kChunk = kWarpSize;`).
assert "constexpr int kChunk = kWarpSize;" in (KERNELS / "ssd_scan.cu").read_text()
SSD_CHUNK = kernel_constant("ssd_scan.cu", "kWarpSize")


def cuda_chunked_scan_model(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            initial_state=None, reverse=False):
    """A CPU model (PyTorch, float64) of the chunked algorithm in plugins/kernels/selective_scan.cu,
    with the kernel's work split read from that source: chunks of LANES x ITEMS_PER_LANE steps,
    per-lane composition of affine maps, the warp's Hillis-Steele shuffle scan, the exclusive
    prefix applied to the carried state, delta = 0 padding past the end, and `reverse` as the
    kernel does it: logical step t at physical step length-1-t. It shows the algorithm computes
    the scan; it does not run the kernel: only `test_cuda_kernel_matches_reference` (CUDA device
    and nvcc) compiles and drives the real kernel."""
    if reverse:
        flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        y, state = cuda_chunked_scan_model(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias,
                                           delta_softplus, initial_state)
        return y.flip(-1), state
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    dstate = A.shape[1]
    carry = u.new_zeros(batch, dim, dstate) if initial_state is None else initial_state.clone()
    lane = torch.arange(LANES)
    y = u.new_empty(batch, dim, length)
    for start in range(0, length, CHUNK):
        steps = min(CHUNK, length - start)

        def lanes(x):  # (..., length) -> (..., LANES, ITEMS_PER_LANE), zeros past the end
            return F.pad(x[..., start:start + steps], (0, CHUNK - steps)).unflatten(-1, (LANES, ITEMS_PER_LANE))

        delta_l, u_l = lanes(delta)[:, :, None], lanes(u)[:, :, None]          # (b, d, 1, lanes, items)
        B_l, C_l = lanes(B)[:, None], lanes(C)[:, None]                        # (b, 1, n, lanes, items)
        decay = torch.exp(delta_l * A[None, :, :, None, None])                 # (b, d, n, lanes, items)
        inputs = delta_l * u_l * B_l
        lane_decay = torch.ones_like(decay[..., 0])
        lane_state = torch.zeros_like(decay[..., 0])
        for k in range(ITEMS_PER_LANE):
            lane_state = decay[..., k] * lane_state + inputs[..., k]
            lane_decay = lane_decay * decay[..., k]
        offset = 1
        while offset < LANES:  # __shfl_up_sync: lanes below `offset` keep their value
            active = lane >= offset
            prev_decay = torch.where(active, lane_decay.roll(offset, -1), lane_decay)
            prev_state = torch.where(active, lane_state.roll(offset, -1), lane_state)
            lane_state = torch.where(active, lane_decay * prev_state + lane_state, lane_state)
            lane_decay = torch.where(active, lane_decay * prev_decay, lane_decay)
            offset *= 2
        start_state = carry[..., None]
        h = torch.where(lane == 0, start_state, lane_decay.roll(1, -1) * start_state + lane_state.roll(1, -1))
        chunk_y = torch.zeros_like(decay[:, :, 0])
        for k in range(ITEMS_PER_LANE):
            h = decay[..., k] * h + inputs[..., k]
            chunk_y[..., k] = (h * C_l[..., k]).sum(2)
        carry = lane_decay[..., -1] * carry + lane_state[..., -1]
        y[..., start:start + steps] = chunk_y.flatten(-2)[..., :steps]
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, carry


def scan_inputs(batch, dim, length, dstate, spec: SelectiveScanSpec, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    raw_delta = rand(batch, dim, length) * 0.5 - 1.0
    return dict(
        # Without the softplus in the op, pass positive steps so the recurrence stays bounded.
        u=rand(batch, dim, length), delta=raw_delta if spec.delta_softplus else F.softplus(raw_delta),
        A=-torch.exp(rand(dim, dstate) * 0.5), B=rand(batch, dstate, length), C=rand(batch, dstate, length),
        D=rand(dim) if spec.has_D else None, z=rand(batch, dim, length) if spec.has_z else None,
        delta_bias=rand(dim) * 0.1 if spec.has_delta_bias else None,
        delta_softplus=spec.delta_softplus,
        initial_state=rand(batch, dim, dstate) if spec.has_initial_state else None, reverse=spec.reverse)


SPECS = [SelectiveScanSpec(),
         SelectiveScanSpec(has_initial_state=True, return_last_state=True),
         SelectiveScanSpec(delta_softplus=False, has_D=False, has_z=False, has_delta_bias=False,
                           return_last_state=True),
         SelectiveScanSpec(has_initial_state=True, return_last_state=True, reverse=True)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, 2 * CHUNK + 188])
def test_cuda_chunked_scan_model_matches_reference(spec, length):
    inputs = scan_inputs(2, 3, length, 5, spec)
    y, state = cuda_chunked_scan_model(**inputs)
    y_ref, state_ref = selective_scan_reference(**inputs, return_last_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-10)


def cuda_ssd_kernel_model(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                          dt_limit=(0.0, math.inf), initial_state=None):
    """A CPU model (PyTorch) of the chunked algorithm in plugins/kernels/ssd_scan.cu, with its chunk
    length read from that source: per chunk of SSD_CHUNK steps (Δ = 0 past the end), the decay
    from the chunk start as an inclusive running sum, the decay to the chunk end as a sum from the
    end, within-chunk weights (C_t·B_s) exp(a_{s+1} + … + a_t) Δ_s summed between s and t, the
    carried state's contribution, and the carry update. One (batch, head) at a time, as one block
    of the kernel works (its head tiles split headdim, which no sum crosses). It does not run the
    kernel: `test_cuda_ssd_kernel_matches_reference` (CUDA device and nvcc) does."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    y = x.new_zeros(x.shape)
    final = x.new_zeros(batch, heads, headdim, dstate)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            state = x.new_zeros(headdim, dstate) if initial_state is None else initial_state[b, h].clone()
            for start in range(0, length, SSD_CHUNK):
                steps = min(SSD_CHUNK, length - start)

                def chunk(t):  # the chunk's rows, zeros past the end
                    return F.pad(t[start:start + steps], (0, 0, 0, SSD_CHUNK - steps))

                delta = F.pad(dt[b, start:start + steps, h], (0, SSD_CHUNK - steps))
                a = delta * A[h]
                from_start = torch.exp(a.cumsum(0))
                # a_{t+1} + … + a_last, summed from the end.
                after = torch.cat([a.flip(0).cumsum(0).flip(0)[1:], a.new_zeros(1)])
                to_end = torch.exp(after) * delta
                x_c, B_c, C_c = chunk(x[b, :, h]), chunk(B[b, :, g]), chunk(C[b, :, g])
                between = torch.stack([torch.stack([a[s + 1:t + 1].sum() for s in range(SSD_CHUNK)])
                                       for t in range(SSD_CHUNK)])
                weights = (C_c @ B_c.T) * torch.exp(between) * delta * torch.ones(SSD_CHUNK, SSD_CHUNK).tril()
                y_c = from_start[:, None] * (C_c @ state.T) + weights @ x_c
                state = from_start[-1] * state + (to_end[:, None] * x_c).T @ B_c
                y[b, start:start + steps, h] = y_c[:steps]
            final[b, h] = state
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, final


def ssd_inputs(batch, length, heads, headdim, groups, dstate, spec: SSDScanSpec, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    raw_dt = rand(batch, length, heads) * 0.5 - 1.0
    return dict(
        # Without the softplus in the op, pass positive steps so the recurrence stays bounded.
        x=rand(batch, length, heads, headdim), dt=raw_dt if spec.dt_softplus else F.softplus(raw_dt),
        A=-torch.exp(rand(heads) * 0.5), B=rand(batch, length, groups, dstate), C=rand(batch, length, groups, dstate),
        D=(rand(heads, headdim) if spec.D_has_hdim else rand(heads)) if spec.has_D else None,
        z=rand(batch, length, heads, headdim) if spec.has_z else None,
        dt_bias=rand(heads) * 0.1 if spec.has_dt_bias else None, dt_softplus=spec.dt_softplus,
        dt_limit=(spec.dt_min, spec.dt_max),
        initial_state=rand(batch, heads, headdim, dstate) if spec.has_initial_state else None)


SSD_SPECS = [SSDScanSpec(),
             SSDScanSpec(has_z=True, D_has_hdim=True, has_initial_state=True, return_final_state=True,
                         dt_min=0.05, dt_max=0.5),
             SSDScanSpec(dt_softplus=False, has_D=False, has_dt_bias=False, return_final_state=True)]


@pytest.mark.parametrize("spec", SSD_SPECS)
@pytest.mark.parametrize("length", [1, SSD_CHUNK - 1, SSD_CHUNK, 2 * SSD_CHUNK + 5])
def test_cuda_ssd_kernel_model_matches_reference(spec, length):
    inputs = ssd_inputs(2, length, 4, 3, 2, 5, spec)
    y, state = cuda_ssd_kernel_model(**inputs)
    y_ref, state_ref = ssd_scan_reference(**inputs, return_final_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-10)


def python_without_site_packages(directory: Path) -> Path:
    """An interpreter wrapper with only the standard library (-I -S: no site-packages, so no torch),
    like the CMake Python of a Jetson or build container that has no PyTorch."""
    wrapper = directory / "python3-stdlib-only"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    wrapper.chmod(0o755)
    probe = subprocess.run([str(wrapper), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    return wrapper


def test_spec_header_generated_from_ops(tmp_path):
    header = tmp_path / "mq_scan_spec.h"
    python = python_without_site_packages(tmp_path)
    subprocess.run([str(python), str(REPO / "plugins" / "gen_spec_header.py"), str(header)], check=True)
    text = header.read_text()
    assert f'#define MQ_SCAN_OP_TYPE "{SCAN_OP_TYPE}"' in text
    assert f'#define MQ_SCAN_PLUGIN_VERSION "{SCAN_PLUGIN_VERSION}"' in text
    assert f'#define MQ_SCAN_PLUGIN_NAMESPACE "{SCAN_PLUGIN_NAMESPACE}"' in text
    assert '"has_initial_state", "return_last_state", "reverse"}' in text
    assert "#define MQ_SCAN_INPUT_GATING_FIELD {-1, -1, -1, -1, -1, 1, 2, 3, 4}" in text
    assert "#define MQ_SCAN_OUTPUT_GATING_FIELD {-1, 5}" in text
    assert f'#define MQ_SSD_OP_TYPE "{SSD_OP_TYPE}"' in text
    assert f'#define MQ_SSD_PLUGIN_VERSION "{SSD_PLUGIN_VERSION}"' in text
    assert f'#define MQ_SSD_PLUGIN_NAMESPACE "{SCAN_PLUGIN_NAMESPACE}"' in text
    assert '"return_final_state", "dt_min", "dt_max"}' in text
    assert "#define MQ_SSD_FIELD_IS_FLOAT {0, 0, 0, 0, 0, 0, 0, 1, 1}" in text
    # D_has_hdim (field 2) gates no input: it changes D's shape, not its presence.
    assert "#define MQ_SSD_INPUT_GATING_FIELD {-1, -1, -1, -1, -1, 1, 3, 4, 5}" in text
    assert "#define MQ_SSD_OUTPUT_GATING_FIELD {-1, 6}" in text
    # Named indices the plugins use instead of hand-written enums.
    assert "#define MQ_SCAN_FIELD_REVERSE 6" in text and "#define MQ_SCAN_INPUT_DELTA_BIAS 7" in text
    assert "#define MQ_SSD_FIELD_DT_MAX 8" in text and "#define MQ_SSD_INPUT_INITIAL_STATE 8" in text


@pytest.mark.parametrize("spec", SPECS + SSD_SPECS)
def test_onnx_node_description_equals_spec_description(spec):
    from onnx import helper

    node = helper.make_node(spec.op_type, spec.input_names(), spec.output_names(), **spec.attributes())
    assert onnx_node_description(node) == spec_node_description(spec)


def test_node_description_writes_float_attributes_as_float32_text():
    text = spec_node_description(SSDScanSpec(dt_min=0.1))
    # 0.1 as float32 is 0.100000001…: the text is the shortest decimal of that float32.
    assert "float dt_min 0.1\n" in text and "float dt_max inf\n" in text
    assert "int dt_softplus 1\n" in text and "string plugin_version 1\n" in text


def test_missing_kernel_library_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.LIBRARY_ENV, str(tmp_path / "absent.so"))
    with pytest.raises(MQExportError, match="kernel library not found") as error:
        kernels.load_library()
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def plugin_build(tmp_path_factory):
    """cmake build of plugins/ for one architecture (the local GPU's, else 90) to keep it fast."""
    if not shutil.which("cmake") or not shutil.which("nvcc"):
        pytest.skip("cmake or nvcc not found")
    arch = "".join(map(str, torch.cuda.get_device_capability(0))) if CUDA else "90"
    build = tmp_path_factory.mktemp("plugins-build")
    # The header generator must run with a Python that has no torch (issue: Jetson build containers).
    python = python_without_site_packages(tmp_path_factory.mktemp("python"))
    configure = ["cmake", "-S", str(REPO / "plugins"), "-B", str(build), f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                 f"-DPython3_EXECUTABLE={python}"]
    if TRT_INCLUDE:
        configure.append(f"-DTENSORRT_INCLUDE_DIR={TRT_INCLUDE}")
    started = time.monotonic()
    configured = subprocess.run(configure, capture_output=True, text=True, check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], capture_output=True, text=True,
                   check=True)
    print(f"plugins build for sm_{arch}: {time.monotonic() - started:.1f} s")
    return build, configured.stdout


def test_kernel_library_exports_c_abi(plugin_build, monkeypatch):
    build, _ = plugin_build
    monkeypatch.setenv(kernels.LIBRARY_ENV, str(build / "libmq_scan_kernels.so"))
    library = kernels.load_library()  # checks mq_scan_abi_version
    params = kernels.ScanParams(batch=1, dim=1, length=1, dstate=1)  # null tensors: rejected before any CUDA call
    assert library.mq_selective_scan_forward(ctypes.byref(params), None) == 1
    ssd_params = kernels.SSDParams(batch=1, length=1, heads=1, headdim=1, ngroups=1, dstate=1)
    assert library.mq_ssd_scan_forward(ctypes.byref(ssd_params), None) == 1
    assert library.mq_scan_status_string(1).startswith(b"invalid argument")
    assert b"shared memory" in library.mq_scan_status_string(3)


@pytest.mark.skipif(bool(TRT_INCLUDE), reason="TensorRT headers given: the plugin is built")
def test_configure_without_tensorrt_says_so_once(plugin_build):
    build, configure_log = plugin_build
    assert configure_log.count("TensorRT headers not found") == 1
    assert not (build / "libmq_trt_plugins.so").exists()


# Sizes of the reference tensors the harness runs enqueue on; length 1 is a decode step.
PREFILL_SIZES = dict(batch=2, length=300, dim=16, dstate=16, heads=4, headdim=24, groups=2)
DECODE_SIZES = {**PREFILL_SIZES, "length": 1}


def reference_outputs(spec, sizes: dict) -> dict:
    """Float32 inputs and reference outputs of one node, by role."""
    if isinstance(spec, SSDScanSpec):
        inputs = ssd_inputs(*(sizes[k] for k in ("batch", "length", "heads", "headdim", "groups", "dstate")), spec,
                            dtype=torch.float32)
        y, final_state = ssd_scan_reference(**inputs, return_final_state=True)
    else:
        inputs = scan_inputs(*(sizes[k] for k in ("batch", "dim", "length", "dstate")), spec, dtype=torch.float32)
        y, final_state = selective_scan_reference(**inputs, return_last_state=True)
    return {**inputs, "y": y, "final_state": final_state}


def write_reference(directory: Path, spec, sizes: dict) -> None:
    """shape.txt ("SIZE VALUE" lines) and float32 NAME.bin files the harness compares enqueue against on a GPU."""
    tensors = reference_outputs(spec, sizes)
    directory.mkdir()
    (directory / "shape.txt").write_text("".join(f"{name} {value}\n" for name, value in sizes.items()))
    for name in spec.input_names() + spec.output_names():
        tensors[name].contiguous().numpy().tofile(directory / f"{name}.bin")


DECODE_STEPS = [SelectiveScanSpec(has_initial_state=True, return_last_state=True),
                SSDScanSpec(has_z=True, has_initial_state=True, return_final_state=True)]
# The bundled Nemotron-H hybrid's decode step node (gate in the RMSNorm outside the op, Δ clamped
# below at time_step_min) at its sizes: 8 heads × 32, one group, d_state 64.
HYBRID_DECODE_STEP = SSDScanSpec(has_initial_state=True, return_final_state=True, dt_min=1e-3)
HYBRID_DECODE_SIZES = dict(batch=2, length=1, heads=8, headdim=32, groups=1, dstate=64)
HARNESS_CASES = ([(spec, PREFILL_SIZES) for spec in SPECS + SSD_SPECS]
                 + [(spec, DECODE_SIZES) for spec in DECODE_STEPS] + [(HYBRID_DECODE_STEP, HYBRID_DECODE_SIZES)])


@pytest.mark.skipif(not TRT_INCLUDE, reason="set MQ_TRT_INCLUDE to a TensorRT include dir to build the plugin")
@pytest.mark.parametrize("spec,sizes", HARNESS_CASES)
def test_plugin_harness(plugin_build, spec, sizes, tmp_path):
    build, _ = plugin_build
    node = tmp_path / "node.txt"
    node.write_text(spec_node_description(spec))
    write_reference(tmp_path / "reference", spec, sizes)
    run = subprocess.run([str(build / "mq_plugin_harness"), str(build / "libmq_trt_plugins.so"), str(node),
                          str(tmp_path / "reference")], capture_output=True, text=True)
    print(run.stdout, run.stderr)
    assert run.returncode == 0
    assert "[FAIL]" not in run.stdout
    assert f"IPluginCreatorV3One named {spec.op_type}" in run.stdout
    assert "[ok]   getOutputShapes, decode step" in run.stdout and "[ok]   onShapeChange accepts a decode step" in run.stdout


def rounded_to(dtype, inputs: dict, activations: set) -> dict:
    """The inputs as the kernel sees them: activations rounded to `dtype`, back in float32."""
    return {k: v.to(dtype).float() if k in activations and v is not None else v for k, v in inputs.items()}


def on_device(dtype, inputs: dict, activations: set) -> dict:
    return {k: (v.to(dtype) if k in activations else v).cuda() if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 1, 1), (2, 19, 700, 16), (1, 8, 300, 256)])
def test_cuda_kernel_matches_reference(plugin_build, monkeypatch, spec, dtype, shape):
    build, _ = plugin_build
    monkeypatch.setenv(kernels.LIBRARY_ENV, str(build / "libmq_scan_kernels.so"))
    inputs = scan_inputs(*shape, spec, dtype=torch.float32)
    activations = {"u", "delta", "B", "C", "z"}
    # The reference runs in float32 on the same (rounded) activations the kernel sees.
    y_ref, state_ref = selective_scan_reference(**rounded_to(dtype, inputs, activations), return_last_state=True)
    y, state = kernels.selective_scan_cuda(**on_device(dtype, inputs, activations), return_last_state=True)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and state.dtype == torch.float32
    torch.testing.assert_close(y.float().cpu(), y_ref.to(dtype).float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(state.cpu(), state_ref, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("spec", SSD_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# (batch, length, heads, headdim, groups, dstate): a decode step; headdim across two head tiles and
# not a multiple of one; d_state 256 (the narrow head tile where shared memory is short).
@pytest.mark.parametrize("shape", [(2, 1, 4, 64, 2, 128), (2, 301, 6, 40, 3, 16), (1, 70, 2, 10, 1, 256)])
def test_cuda_ssd_kernel_matches_reference(plugin_build, monkeypatch, spec, dtype, shape):
    build, _ = plugin_build
    monkeypatch.setenv(kernels.LIBRARY_ENV, str(build / "libmq_scan_kernels.so"))
    inputs = ssd_inputs(*shape, spec, dtype=torch.float32)
    activations = {"x", "dt", "B", "C", "z"}
    y_ref, state_ref = ssd_scan_reference(**rounded_to(dtype, inputs, activations), return_final_state=True)
    y, state = kernels.ssd_scan_cuda(**on_device(dtype, inputs, activations), return_final_state=True)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and state.dtype == torch.float32
    torch.testing.assert_close(y.float().cpu(), y_ref.to(dtype).float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(state.cpu(), state_ref, rtol=tolerance, atol=tolerance)
