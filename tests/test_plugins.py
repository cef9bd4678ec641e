"""plugins/: a CPU model of the CUDA kernel's chunked scan algorithm, the CUDA kernel library,
the TensorRT plugin harness.

Without nvcc/cmake the build tests skip; without TensorRT headers (env MQ_TRT_INCLUDE: a directory
holding NvInferRuntime.h) the harness tests skip; without a CUDA device the kernel comparisons skip.
"""
from __future__ import annotations

import ctypes
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
from mq_export.ops.spec import SCAN_OP_TYPE, SCAN_PLUGIN_NAMESPACE, SCAN_PLUGIN_VERSION, SelectiveScanSpec
from mq_export.ops.plugin_spec import onnx_node_description, spec_node_description
from mq_export.ops.selective_scan import selective_scan_reference

REPO = Path(__file__).resolve().parents[1]
TRT_INCLUDE = os.environ.get("MQ_TRT_INCLUDE")
CUDA = torch.cuda.is_available()

CUDA_KERNEL_SOURCE = REPO / "plugins" / "kernels" / "selective_scan.cu"


def kernel_constant(name: str) -> int:
    """A `constexpr int` of the CUDA kernel source, so the CPU model below uses the kernel's work split."""
    match = re.search(rf"constexpr int {name} = (\d+);", CUDA_KERNEL_SOURCE.read_text())
    assert match, f"{name} is not a constexpr int of {CUDA_KERNEL_SOURCE.name}"
    return int(match.group(1))


LANES = kernel_constant("kWarpSize")
ITEMS_PER_LANE = kernel_constant("kItemsPerLane")
CHUNK = LANES * ITEMS_PER_LANE


def cuda_chunked_scan_model(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            initial_state=None):
    """A CPU model (PyTorch, float64) of the chunked algorithm in plugins/kernels/selective_scan.cu,
    with the kernel's work split read from that source: chunks of LANES x ITEMS_PER_LANE steps,
    per-lane composition of affine maps, the warp's Hillis-Steele shuffle scan, the exclusive
    prefix applied to the carried state, and delta = 0 padding past the end. It shows the
    algorithm computes the scan; it does not run the kernel: only `test_cuda_kernel_matches_reference`
    (CUDA device and nvcc) compiles and drives the real kernel."""
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
        initial_state=rand(batch, dim, dstate) if spec.has_initial_state else None)


SPECS = [SelectiveScanSpec(),
         SelectiveScanSpec(has_initial_state=True, return_last_state=True),
         SelectiveScanSpec(delta_softplus=False, has_D=False, has_z=False, has_delta_bias=False,
                           return_last_state=True)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, 2 * CHUNK + 188])
def test_cuda_chunked_scan_model_matches_reference(spec, length):
    inputs = scan_inputs(2, 3, length, 5, spec)
    y, state = cuda_chunked_scan_model(**inputs)
    y_ref, state_ref = selective_scan_reference(**inputs, return_last_state=True)
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
    assert '"has_initial_state", "return_last_state"}' in text
    assert "#define MQ_SCAN_INPUT_GATING_FIELD {-1, -1, -1, -1, -1, 1, 2, 3, 4}" in text


@pytest.mark.parametrize("spec", SPECS)
def test_onnx_node_description_equals_spec_description(spec):
    from onnx import helper

    node = helper.make_node(SCAN_OP_TYPE, spec.input_names(), spec.output_names(), **spec.attributes())
    assert onnx_node_description(node) == spec_node_description(spec)


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
    assert library.mq_scan_status_string(1).startswith(b"invalid argument")


@pytest.mark.skipif(bool(TRT_INCLUDE), reason="TensorRT headers given: the plugin is built")
def test_configure_without_tensorrt_says_so_once(plugin_build):
    build, configure_log = plugin_build
    assert configure_log.count("TensorRT headers not found") == 1
    assert not (build / "libmq_trt_plugins.so").exists()


def write_reference(directory: Path, spec: SelectiveScanSpec) -> None:
    """shape.txt and float32 NAME.bin files the harness compares enqueue against on a GPU."""
    batch, dim, length, dstate = 2, 16, 300, 16
    inputs = scan_inputs(batch, dim, length, dstate, spec, dtype=torch.float32)
    y, final_state = selective_scan_reference(**inputs, return_last_state=True)
    tensors = {**inputs, "y": y, "final_state": final_state}
    directory.mkdir()
    (directory / "shape.txt").write_text(f"{batch} {dim} {length} {dstate}\n")
    for name in spec.input_names() + spec.output_names():
        tensors[name].contiguous().numpy().tofile(directory / f"{name}.bin")


@pytest.mark.skipif(not TRT_INCLUDE, reason="set MQ_TRT_INCLUDE to a TensorRT include dir to build the plugin")
@pytest.mark.parametrize("spec", SPECS)
def test_plugin_harness(plugin_build, spec, tmp_path):
    build, _ = plugin_build
    node = tmp_path / "node.txt"
    node.write_text(spec_node_description(spec))
    write_reference(tmp_path / "reference", spec)
    run = subprocess.run([str(build / "mq_plugin_harness"), str(build / "libmq_trt_plugins.so"), str(node),
                          str(tmp_path / "reference")], capture_output=True, text=True)
    print(run.stdout, run.stderr)
    assert run.returncode == 0
    assert "[FAIL]" not in run.stdout


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
    rounded = {k: v.to(dtype).float() if k in activations and v is not None else v for k, v in inputs.items()}
    y_ref, state_ref = selective_scan_reference(**rounded, return_last_state=True)
    device = {k: (v.to(dtype) if k in activations else v).cuda() if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    y, state = kernels.selective_scan_cuda(**device, return_last_state=True)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and state.dtype == torch.float32
    torch.testing.assert_close(y.float().cpu(), y_ref.to(dtype).float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(state.cpu(), state_ref, rtol=tolerance, atol=tolerance)
