"""What the hybrids' mixtures of experts share (Jamba's SparseMoE, Nemotron-H's MoE): the routed
experts' weighted sum, computed densely so that it exports as fixed-shape standard ONNX ops."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def mix_experts(experts: nn.ModuleList, x: Tensor, picked: Tensor, weights: Tensor) -> Tensor:
    """Σ weights[k] · experts[picked[k]](x) over the `picked` experts of each token (picked and
    weights: (…, top_k)). Every expert runs on every token, weighted 0 where the router did not pick
    it: the sum transformers takes over the picked ones, with no data-dependent shapes (so the
    export keeps dynamic batch and length), at len(experts) / top_k times the expert FLOPs."""
    dense = weights.new_zeros(*weights.shape[:-1], len(experts)).scatter(-1, picked, weights)
    outputs = torch.stack([expert(x) for expert in experts], dim=-1)     # (…, d_out, experts)
    return (outputs @ dense[..., None]).squeeze(-1)
