import math

import pytest
import torch
import torch.nn.functional as F

from mq_export.ops import cpu_kernel
from mq_export.ops.selective_scan import selective_scan, selective_scan_chunked, selective_scan_reference

from .conftest import random_scan_inputs


def test_hand_computed_two_steps():
    # d = n = 1, no softplus: h1 = Δ1·B1·u1, h2 = e^{Δ2·A}·h1 + Δ2·B2·u2, y = C·h + D·u.
    u = torch.tensor([[[1.0, 2.0]]])
    delta = torch.tensor([[[0.5, 1.0]]])
    A = torch.tensor([[-2.0]])
    B = torch.tensor([[[3.0, 1.0]]])
    C = torch.tensor([[[1.0, 2.0]]])
    D = torch.tensor([0.5])
    h1 = 0.5 * 3.0 * 1.0
    h2 = math.exp(-2.0) * h1 + 1.0 * 1.0 * 2.0
    expected = torch.tensor([[[h1 * 1.0 + 0.5 * 1.0, h2 * 2.0 + 0.5 * 2.0]]])
    for scan in (selective_scan_reference, selective_scan_chunked, selective_scan):
        y, last = scan(u, delta, A, B, C, D, return_last_state=True)
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(last, torch.tensor([[[h2]]]))


def test_gate_bias_and_softplus_semantics():
    x = random_scan_inputs(length=5)
    plain = selective_scan_reference(x["u"], F.softplus(x["delta"] + x["delta_bias"][:, None]), x["A"], x["B"],
                                     x["C"], x["D"])
    fused = selective_scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(fused, plain * F.silu(x["z"]))


@pytest.mark.parametrize("length", [1, 7, 16, 37])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_equals_reference(length, chunk):
    x = random_scan_inputs(length=length)
    h0 = torch.randn(2, 6, 4)
    ref_y, ref_h = selective_scan_reference(**x, delta_softplus=True, return_last_state=True, initial_state=h0)
    y, h = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, initial_state=h0, chunk=chunk)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)


def test_state_carries_across_calls():
    x = random_scan_inputs(length=20)
    full = selective_scan(**x, delta_softplus=True)
    first = {k: (v[..., :12] if v.dim() == 3 else v) for k, v in x.items()}
    second = {k: (v[..., 12:] if v.dim() == 3 else v) for k, v in x.items()}
    y1, h = selective_scan(**first, delta_softplus=True, return_last_state=True)
    y2 = selective_scan(**second, delta_softplus=True, initial_state=h)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-5, atol=1e-5)


needs_cpu_kernel = pytest.mark.skipif(cpu_kernel.load() is None,
                                      reason="no C compiler: the fused CPU scan kernel cannot be built")


@needs_cpu_kernel
@pytest.mark.parametrize("length", [1, 7, 300])
@pytest.mark.parametrize("options", ["all", "bare"])
def test_fused_cpu_kernel_equals_reference(length, options):
    x = random_scan_inputs(length=length)
    if options == "bare":       # every optional input absent, no softplus, no state
        x = {k: v for k, v in x.items() if k in ("u", "delta", "A", "B", "C")}
        x["delta"] = F.softplus(x["delta"])
        kwargs = {}
    else:
        kwargs = dict(delta_softplus=True, return_last_state=True, initial_state=torch.randn(2, 6, 4))
    expected = selective_scan_reference(**x, **kwargs)
    got = cpu_kernel.selective_scan_fused(**{k: x.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                                    "delta_bias")},
                                          delta_softplus=kwargs.get("delta_softplus", False),
                                          initial_state=kwargs.get("initial_state"),
                                          return_last_state=kwargs.get("return_last_state", False))
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
def test_selective_scan_takes_the_fused_kernel_and_falls_back(monkeypatch):
    x = random_scan_inputs(length=9)
    calls = []
    real = cpu_kernel.selective_scan_fused
    monkeypatch.setattr(cpu_kernel, "selective_scan_fused", lambda *a: calls.append(1) or real(*a))
    fused = selective_scan(**x, delta_softplus=True)
    assert calls == [1]
    # float64 is not the kernel's: the PyTorch path runs and agrees.
    double = selective_scan(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    assert calls == [1]
    torch.testing.assert_close(double.float(), fused, rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
def test_fused_kernel_leaves_the_callers_float_mode_alone():
    # The kernel flushes subnormals only inside its own call; loading and running it must not
    # switch the process to flush-to-zero (as linking with -ffast-math's crtfastmath would).
    torch.set_flush_denormal(False)
    cpu_kernel.selective_scan_fused(**random_scan_inputs(length=4), delta_softplus=True, initial_state=None,
                                    return_last_state=False)
    tiny = torch.tensor([1e-39]) * torch.tensor([1.0])
    assert tiny.item() != 0.0
