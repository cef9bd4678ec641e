"""The SSD scan's implementations against the sequential reference: chunked PyTorch, fused C kernel."""
from __future__ import annotations

import pytest
import torch

from mq_export.errors import MQExportError
from mq_export.ops import ssd_cpu_kernel
from mq_export.ops.ssd_scan import NO_DT_LIMIT, SSDScanOp, ssd_scan, ssd_scan_chunked, ssd_scan_reference

# (batch, length, heads, headdim, groups, d_state): groups > 1, headdim not a power of two, lengths
# not multiples of any chunk tried.
ODD = (2, 37, 6, 5, 3, 7)


def scan_inputs(batch, length, heads, headdim, groups, d_state, *, seed=0, D_per_channel=True, with_z=True,
                with_bias=True, dt_limit=(0.01, 2.0), initial=True):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return dict(x=rand(batch, length, heads, headdim), dt=rand(batch, length, heads),
                A=-torch.rand(heads, generator=gen) * 4, B=rand(batch, length, groups, d_state),
                C=rand(batch, length, groups, d_state),
                D=rand(heads, headdim) if D_per_channel else rand(heads),
                z=rand(batch, length, heads, headdim) if with_z else None,
                dt_bias=rand(heads) if with_bias else None, dt_softplus=True, dt_limit=dt_limit,
                initial_state=rand(batch, heads, headdim, d_state) if initial else None,
                return_final_state=True)


def assert_close_relative(actual, expected, tol):
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("variant", [
    dict(),
    dict(D_per_channel=False, with_z=False, with_bias=False, dt_limit=NO_DT_LIMIT, initial=False),
    dict(dt_limit=(0.0, 0.3)),
], ids=["all", "bare", "upper-limit"])
def test_chunked_equals_reference(chunk, variant):
    kw = scan_inputs(*ODD, **variant)
    y_ref, state_ref = ssd_scan_reference(**kw)
    y, state = ssd_scan_chunked(**kw, chunk=chunk)
    assert_close_relative(y, y_ref, 1e-5)
    assert_close_relative(state, state_ref, 1e-5)


def test_chunked_gradients_equal_reference():
    kw = scan_inputs(1, 11, 4, 3, 2, 5)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]
    grads = []
    for scan in (ssd_scan_reference, lambda **k: ssd_scan_chunked(**k, chunk=4)):
        leaves = {name: kw[name].clone().requires_grad_() for name in names}
        y, state = scan(**{**kw, **leaves})
        (y.square().sum() + state.sum()).backward()
        grads.append({name: leaves[name].grad for name in names})
    for name in names:
        assert_close_relative(grads[1][name], grads[0][name], 1e-5)


def test_dispatch_takes_the_differentiable_path_under_autograd():
    kw = scan_inputs(*ODD)
    x = kw.pop("x").requires_grad_()
    y, _ = ssd_scan(x, **kw)
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_op_module_calls_the_scan():
    kw = scan_inputs(*ODD)
    kw["return_final_state"] = False
    with torch.no_grad():
        assert_close_relative(SSDScanOp()(**kw), ssd_scan_reference(**kw), 1e-5)


def test_d_state_beyond_the_kernel_limit_takes_the_chunked_path():
    kw = scan_inputs(1, 5, 2, 2, 1, ssd_cpu_kernel.MAX_DSTATE + 1)
    assert not ssd_cpu_kernel.supports(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"])
    with torch.no_grad():
        y, state = ssd_scan(**kw)
    y_ref, state_ref = ssd_scan_reference(**kw)
    assert_close_relative(y, y_ref, 1e-5)
    assert_close_relative(state, state_ref, 1e-5)


def test_groups_must_divide_heads():
    kw = scan_inputs(1, 3, 6, 2, 4, 3, initial=False)
    with pytest.raises(MQExportError, match="4 groups of B/C do not divide 6 heads"):
        ssd_scan_chunked(**kw)


kernel = pytest.mark.skipif(ssd_cpu_kernel.load() is None, reason="no C compiler: the fused SSD kernel is not built")


@kernel
@pytest.mark.parametrize("variant", [
    dict(),
    dict(D_per_channel=False, with_z=False, with_bias=False, dt_limit=NO_DT_LIMIT, initial=False),
    dict(dt_limit=(0.0, 0.3)),
], ids=["all", "bare", "upper-limit"])
def test_fused_equals_reference(variant):
    kw = scan_inputs(*ODD, **variant)
    y_ref, state_ref = ssd_scan_reference(**kw)
    with torch.no_grad():
        y, state = ssd_cpu_kernel.ssd_scan_fused(**kw)
    assert_close_relative(y, y_ref, 1e-5)
    assert_close_relative(state, state_ref, 1e-5)


@kernel
def test_fused_reads_strided_views_as_the_model_passes_them():
    """x, B, C as the mixer makes them: views into one channel-major (b, conv_dim, l) conv output."""
    b, l, h, p, g, n = 2, 19, 4, 6, 2, 8
    gen = torch.Generator().manual_seed(3)
    xBC = torch.randn(b, h * p + 2 * g * n, l, generator=gen).transpose(1, 2)
    x, B, C = torch.split(xBC, [h * p, g * n, g * n], dim=-1)
    kw = dict(x=x.unflatten(-1, (h, p)), dt=torch.randn(b, l, h, generator=gen), A=-torch.rand(h, generator=gen),
              B=B.unflatten(-1, (g, n)), C=C.unflatten(-1, (g, n)), D=torch.randn(h, generator=gen),
              z=torch.randn(b, h * p, l, generator=gen).transpose(1, 2).unflatten(-1, (h, p)), dt_softplus=True)
    assert not kw["x"].is_contiguous()
    with torch.no_grad():
        assert_close_relative(ssd_scan(**kw), ssd_scan_reference(**kw), 1e-5)


@kernel
def test_dispatch_uses_the_fused_kernel_without_autograd(monkeypatch):
    calls = []
    fused = ssd_cpu_kernel.ssd_scan_fused
    monkeypatch.setattr(ssd_cpu_kernel, "ssd_scan_fused", lambda *a: calls.append(1) or fused(*a))
    kw = scan_inputs(*ODD)
    with torch.no_grad():
        y, _ = ssd_scan(**kw)
    assert calls == [1]
    assert_close_relative(y, ssd_scan_reference(**kw)[0], 1e-5)


@kernel
def test_fused_final_state_continues_the_sequence():
    kw = scan_inputs(2, 23, 4, 3, 1, 5, initial=False)
    kw["return_final_state"] = False
    cut = 10
    first = {k: v[:, :cut] if k in ("x", "dt", "B", "C", "z") else v for k, v in kw.items()}
    rest = {k: v[:, cut:] if k in ("x", "dt", "B", "C", "z") else v for k, v in kw.items()}
    with torch.no_grad():
        whole = ssd_scan(**kw)
        y1, state = ssd_scan(**{**first, "return_final_state": True})
        y2 = ssd_scan(**{**rest, "initial_state": state})
    assert_close_relative(torch.cat([y1, y2], dim=1), whole, 1e-5)
