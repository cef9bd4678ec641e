"""The SSD scan of Mamba-2, with the semantics of mamba-ssm's `mamba_chunk_scan_combined`.

Models call it through an `SSDScanOp` module they hold: that module is the boundary the ONNX
exporter turns into one custom `SSDScan` node (as `SelectiveScanOp` is for Mamba-1). Three
implementations, tested against each other: `ssd_scan_reference`, the readable sequential
recurrence; `ssd_scan_chunked`, the SSD matmul formulation in PyTorch (differentiable, any device);
and the fused C kernel (`ssd_cpu_kernel`). `ssd_scan` picks one.

Shapes (mamba-ssm layout): x, z: (b, l, h, p); dt: (b, l, h); A, dt_bias: (h,); B, C: (b, l, g, n)
with g dividing h (head i reads group i // (h / g)); D: (h,) or (h, p);
initial_state / final state: (b, h, p, n).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ssd_cpu_kernel
from ..errors import MQExportError

NO_DT_LIMIT = (0.0, math.inf)
# Time steps per chunk of `ssd_scan_chunked`. Measured (2 threads, loaded machine, b 4 × l 1024,
# 24 heads × 64, d_state 128, median of 3): chunk 16 1.39 s, 32 1.15 s, 64 0.89 s, 128 1.13 s, 256 1.40 s.
DEFAULT_CHUNK = 64


def _check_groups(heads: int, groups: int) -> None:
    if heads % groups:
        raise MQExportError(f"ssd_scan: {groups} groups of B/C do not divide {heads} heads")


def _discretize_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool,
                  dt_limit: tuple[float, float]) -> Tensor:
    """Δ = clamp(softplus?(dt + dt_bias), dt_limit), (b, l, h)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _finish(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y


def ssd_scan_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                       dt_limit: tuple[float, float] = NO_DT_LIMIT, initial_state: Tensor | None = None,
                       return_final_state: bool = False):
    """Sequential reference, one time step at a time; per head, with a scalar decay:

    Δ_t = clamp(softplus(dt_t + dt_bias), dt_limit),
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t,   y_t = h_t C_t + D x_t,   out = y ⊙ SiLU(z).
    """
    batch, length, heads, headdim = x.shape
    groups = B.shape[2]
    _check_groups(heads, groups)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)
    # Each head reads its group's B and C.
    B = B.repeat_interleave(heads // groups, dim=2)                                # (b, l, h, n)
    C = C.repeat_interleave(heads // groups, dim=2)
    state = (x.new_zeros(batch, heads, headdim, B.shape[-1]) if initial_state is None
             else initial_state.to(x.dtype))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]                         # (b, h, 1, 1)
        update = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]   # (b, h, p, n)
        state = decay * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = _finish(torch.stack(ys, dim=1), x, D, z)                                   # (b, l, h, p)
    return (y, state) if return_final_state else y


def _segment_sums(a: Tensor) -> Tensor:
    """(…, T) → (…, T, T): [i, j] = a_{j+1} + … + a_i for i ≥ j, −inf above the diagonal, so that
    exp of it is the decay from step j to step i. Summed as a masked cumulative sum, not as a
    difference of cumulative sums, which loses precision once the sums grow large."""
    steps = a.shape[-1]
    strictly_lower = torch.ones(steps, steps, dtype=torch.bool, device=a.device).tril(-1)
    sums = a[..., :, None].expand(*a.shape, steps).masked_fill(~strictly_lower, 0).cumsum(-2)
    return sums.masked_fill(~strictly_lower.logical_or(torch.eye(steps, dtype=torch.bool, device=a.device)),
                            -math.inf)


def ssd_scan_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                     z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                     dt_limit: tuple[float, float] = NO_DT_LIMIT, initial_state: Tensor | None = None,
                     return_final_state: bool = False, chunk: int = DEFAULT_CHUNK):
    """The SSD matmul formulation (Mamba-2 paper, `ssd_minimal_discrete`), equal to `ssd_scan_reference`
    and differentiable: the sequence is cut into chunks of `chunk` steps. Within a chunk, outputs
    are masked matmuls, y_i = Σ_{j≤i} (C_i·B_j) exp(Σ_{j<k≤i} Δ_k A) Δ_j x_j, with C·B formed once per
    group of heads; between chunks, each chunk's end state (its inputs decayed to its last step)
    is passed on sequentially, and its effect on the next chunk's outputs is C_i·h exp(Σ_{k≤i} Δ_k A).
    Steps padded to a whole chunk have Δ = 0: they leave the state unchanged.
    """
    batch, length, heads, headdim = x.shape
    groups, n = B.shape[2], B.shape[3]
    _check_groups(heads, groups)
    per_group = heads // groups
    delta = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)                       # (b, l, h)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length

    def chunked(t: Tensor) -> Tensor:   # (b, l, …) → (b, chunks, T, …)
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).unflatten(1, (n_chunks, chunk))

    # Heads as (group, head within group); time last where it is a matmul dimension.
    xd = chunked(x * delta[..., None]).unflatten(3, (groups, per_group)).permute(0, 1, 3, 4, 2, 5)  # (b,c,g,r,T,p)
    a = chunked(delta * A).unflatten(3, (groups, per_group)).permute(0, 1, 3, 4, 2)                # (b,c,g,r,T)
    Bc = chunked(B).permute(0, 1, 3, 2, 4)[:, :, :, None]                                          # (b,c,g,1,T,n)
    Cc = chunked(C).permute(0, 1, 3, 2, 4)[:, :, :, None]
    decay_from_start = a.cumsum(-1)                                                                # (b,c,g,r,T)
    # Within chunks.
    weights = (Cc @ Bc.transpose(-1, -2)) * torch.exp(_segment_sums(a))                          # (b,c,g,r,T,T)
    y = weights @ xd                                                                               # (b,c,g,r,T,p)
    # Each chunk's inputs carried to its end: (b,c,g,r,p,n).
    decay_to_end = torch.exp(decay_from_start[..., -1:] - decay_from_start)
    chunk_states = (xd * decay_to_end[..., None]).transpose(-1, -2) @ Bc
    chunk_decay = torch.exp(decay_from_start[..., -1])[..., None, None]                          # (b,c,g,r,1,1)
    state = (x.new_zeros(batch, groups, per_group, headdim, n) if initial_state is None
             else initial_state.to(x.dtype).unflatten(1, (groups, per_group)))
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, c] * state + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)                                                        # (b,c,g,r,p,n)
    y = y + (Cc @ entering.transpose(-1, -2)) * torch.exp(decay_from_start)[..., None]
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(batch, n_chunks * chunk, heads, headdim)[:, :length]
    y = _finish(y, x, D, z)
    return (y, state.flatten(1, 2)) if return_final_state else y


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = NO_DT_LIMIT, initial_state: Tensor | None = None,
             return_final_state: bool = False):
    """The scan the models call, equal to `ssd_scan_reference`: the fused C kernel for fp32 CPU
    inputs where it builds, else `ssd_scan_chunked`, which also serves whenever autograd needs
    the scan (the kernel is not differentiable)."""
    if torch.compiler.is_exporting():
        raise MQExportError("ssd_scan was called directly in a forward being exported; call it through an "
                            "SSDScanOp submodule, which the exporter turns into one SSDScan node")
    _check_groups(x.shape[2], B.shape[2])
    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state, return_final_state)
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad and ssd_cpu_kernel.supports(*tensors):
        return ssd_cpu_kernel.ssd_scan_fused(*args)
    return ssd_scan_chunked(*args)


class SSDScanOp(nn.Module):
    """`ssd_scan` as a module (no parameters): a model holds one per scan call site, so the exporter
    can replace the scan of exactly that model's instances with one SSDScan node."""

    def forward(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                dt_limit: tuple[float, float] = NO_DT_LIMIT, initial_state: Tensor | None = None,
                return_final_state: bool = False):
        return ssd_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state, return_final_state)
