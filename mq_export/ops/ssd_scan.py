"""The SSD scan of Mamba-2, with the semantics of mamba-ssm's `mamba_chunk_scan_combined`.

Models call it through an `SSDScanOp` module they hold, the boundary a future exporter turns into
one custom `SSDScan` node (as `SelectiveScanOp` is for Mamba-1). For now the op has one
implementation, the readable sequential recurrence; the chunked (SSD matmul) form and a fused
kernel are to be tested against it.

Shapes (mamba-ssm layout): x, z: (b, l, h, p); dt: (b, l, h); A, dt_bias: (h,); B, C: (b, l, g, n)
with g dividing h (head i reads group i // (h / g)); D: (h,) or (h, p);
initial_state / final state: (b, h, p, n).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MQExportError

NO_DT_LIMIT = (0.0, math.inf)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = NO_DT_LIMIT, initial_state: Tensor | None = None,
             return_final_state: bool = False):
    """Sequential reference, one time step at a time; per head, with a scalar decay:

    Δ_t = clamp(softplus(dt_t + dt_bias), dt_limit),
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t,   y_t = h_t C_t + D x_t,   out = y ⊙ SiLU(z).
    """
    batch, length, heads, headdim = x.shape
    groups = B.shape[2]
    if heads % groups:
        raise MQExportError(f"ssd_scan: {groups} groups of B/C do not divide {heads} heads")
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
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
    y = torch.stack(ys, dim=1)                                                     # (b, l, h, p)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return (y, state) if return_final_state else y


class SSDScanOp(nn.Module):
    """`ssd_scan` as a module (no parameters): a model holds one per scan call site, so an exporter
    can replace the scan of exactly that model's instances."""

    def forward(self, *args, **kwargs):
        if torch.compiler.is_exporting():
            raise MQExportError("ONNX export of Mamba-2 models is not supported yet: it lands with the SSDScan "
                                "op's exporter")
        return ssd_scan(*args, **kwargs)
