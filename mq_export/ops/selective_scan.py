"""The selective scan of Mamba-1, with the semantics of mamba-ssm's `selective_scan_fn`.

Models call the scan through a `SelectiveScanOp` module they hold: that module is the boundary
the ONNX exporter turns into one custom `SelectiveScan` node (by translating that model's
instances while it traces, nothing global), so everything inside it (Δ bias and softplus, the
recurrence, the C read-out, the D skip and the SiLU(z) gate) is one op, and everything outside
it is standard ops. `DeltaProjection` is the Linear that makes Δ, whose bias the scan applies.

Shapes (mamba-ssm layout): u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,);
initial_state / final state: (b, d, n).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernel, cpu_scan_grad
from ..errors import MQExportError


def _discretize_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False, initial_state: Tensor | None = None,
                             reverse: bool = False):
    """Readable sequential scan, one time step at a time, as in the Mamba paper:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t,   y_t = h_t · C_t + D u_t,   out = y ⊙ SiLU(z);
    with `reverse`, h_{t+1} takes the place of h_{t-1}.
    """
    delta = _discretize_delta(delta, delta_bias, delta_softplus)
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if initial_state is None else initial_state.to(u.dtype)
    ys: list[Tensor] = [u.new_empty(0)] * length
    for t in (reversed(range(length)) if reverse else range(length)):
        decay = torch.exp(delta[:, :, t, None] * A)                                  # (b, d, n)
        h = decay * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys[t] = torch.einsum("bdn,bn->bd", h, C[:, :, t])
    y = _finish(torch.stack(ys, dim=-1), u, D, z)
    return (y, h) if return_last_state else y


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: Tensor | None = None,
                   reverse: bool = False):
    """The scan the models call, equal to `selective_scan_reference`: the fused C kernel
    (`cpu_kernel`) for fp32 CPU inputs where it builds, else `selective_scan_chunked`; when
    autograd needs it, the kernel with its backward kernel (`cpu_scan_grad`) where they apply,
    else `selective_scan_differentiable`."""
    if torch.compiler.is_exporting():
        raise MQExportError("selective_scan was called directly in a forward being exported; call it through a "
                            "SelectiveScanOp submodule, which the exporter turns into one SelectiveScan node")
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # The fused kernel has a backward kernel for a scan from a zero state; the rest trains in PyTorch.
        if initial_state is None and not return_last_state and cpu_scan_grad.supports(*tensors):
            return cpu_scan_grad.selective_scan_trainable(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                          reverse)
        return selective_scan_differentiable(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                             return_last_state, initial_state, reverse)
    if cpu_kernel.supports(*tensors):
        return cpu_kernel.selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                               initial_state, return_last_state, reverse)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state, initial_state, reverse=reverse)


def selective_scan_differentiable(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                  D: Tensor | None = None, z: Tensor | None = None,
                                  delta_bias: Tensor | None = None, delta_softplus: bool = False,
                                  return_last_state: bool = False, initial_state: Tensor | None = None,
                                  reverse: bool = False):
    """`selective_scan_reference` in the form autograd handles well: decays and inputs for all steps
    at once, one out-of-place multiply-add per step (no in-place buffers, which autograd cannot
    differentiate), the read-out against C as one batched product."""
    delta = _discretize_delta(delta, delta_bias, delta_softplus).transpose(1, 2)   # (b, l, d)
    decays = torch.exp(delta[..., None] * A).unbind(1)                             # l × (b, d, n)
    # unbind, not indexing: an indexed slice's backward writes a full-size zero gradient per step.
    inputs = ((delta * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]).unbind(1)
    h = inputs[0].new_zeros(inputs[0].shape) if initial_state is None else initial_state.to(u.dtype)
    states: list[Tensor] = [h] * len(inputs)
    for t in (reversed(range(len(inputs))) if reverse else range(len(inputs))):
        h = torch.addcmul(inputs[t], decays[t], h)
        states[t] = h
    y = (torch.stack(states, 1) @ C.transpose(1, 2)[..., None]).squeeze(-1)        # (b, l, d)
    y = _finish(y.transpose(1, 2), u, D, z)
    return (y, h) if return_last_state else y


class SelectiveScanOp(nn.Module):
    """`selective_scan` as a module (no parameters): a model holds one per scan call site, so an
    exporter or a training script can replace the scan of exactly that model's instances."""

    def forward(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                D: Tensor | None = None, z: Tensor | None = None,
                delta_bias: Tensor | None = None, delta_softplus: bool = False,
                return_last_state: bool = False, initial_state: Tensor | None = None, reverse: bool = False):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                              reverse)


class DeltaProjection(nn.Linear):
    """The Linear that makes the scan's Δ (mamba-ssm's `dt_proj`): its forward applies only the
    weight, because its bias is the scan's `delta_bias`, added inside the scan before the softplus."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None,
                           delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False, initial_state: Tensor | None = None,
                           reverse: bool = False, chunk: int = 8):
    """Tensor-at-a-time scan in PyTorch (any device and dtype), equal to `selective_scan_reference`.

    Per chunk of time steps, the decays exp(Δ·A) and inputs Δ·B·u are computed for all steps
    at once; the recurrence then runs in place over a contiguous (b, d, n) slab per step, and the
    read-out against C is one multiply-reduce per chunk. Time-major layout keeps every step's
    slab contiguous; with `reverse` those time-major copies are made in scan order (time
    flipped), and y is flipped back once.
    """
    delta = _discretize_delta(delta, delta_bias, delta_softplus)
    b, d, length = u.shape
    n = A.shape[1]

    def scan_order(x: Tensor) -> Tensor:                    # (b, k, l) → contiguous (b, l, k)
        x = x.transpose(1, 2)
        return (x.flip(1) if reverse else x).contiguous()

    delta_t, du_t, B_t, C_t = (scan_order(x) for x in (delta, delta * u, B, C))   # (b,l,d) ×2, (b,l,n) ×2
    h = u.new_zeros(b, d, n) if initial_state is None else initial_state.to(u.dtype)
    y = u.new_empty(b, length, d)
    # Reused buffers: fresh multi-MB allocations per chunk cost more in page faults than the math.
    decay_buf = u.new_empty(b, chunk, d, n)
    states_buf = u.new_empty(b, chunk, d, n)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        steps = stop - start
        decay, states = decay_buf[:, :steps], states_buf[:, :steps]
        torch.mul(delta_t[:, start:stop, :, None], A, out=decay).exp_()                  # exp(Δ·A)
        torch.mul(du_t[:, start:stop, :, None], B_t[:, start:stop, None, :], out=states)  # Δ·B·u
        states[:, 0].addcmul_(h, decay[:, 0])
        for t in range(1, steps):
            states[:, t].addcmul_(states[:, t - 1], decay[:, t])
        h = states[:, -1].clone()
        # Read-out h·C, reusing the decay buffer as scratch (a batched mat-vec is slower here).
        torch.mul(states, C_t[:, start:stop, None, :], out=decay)
        y[:, start:stop] = decay.sum(-1)
    y = _finish((y.flip(1) if reverse else y).transpose(1, 2), u, D, z)
    return (y, h) if return_last_state else y
