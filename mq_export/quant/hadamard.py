"""Hadamard matrices of non-power-of-two orders, and the seeded random-sign Hadamard rotation.

Supported orders n = 2^k · m with m one of
  * 1 (Sylvester),
  * q + 1 for a prime q ≡ 3 (mod 4)   (Paley I: 4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, …),
  * 2(q + 1) for a prime q ≡ 1 (mod 4) (Paley II: 12, 28, 36, 60, 76, 108, …),
combined by Kronecker product with a Sylvester matrix. This covers every Mamba width in use
(768 = 12·64, 1536 = 12·128, 2560 = 20·128, dt ranks 48, 96, 160 = 20·8, …) and the small test
widths 48 and 96. Other orders (any n not 1, 2 or a multiple of 4, and rare ones such as 92)
raise an `MQExportError` rather than silently using a non-Hadamard rotation.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..errors import MQExportError

SUPPORTED_ORDERS = "2^k·m with m = 1, q+1 (prime q ≡ 3 mod 4) or 2(q+1) (prime q ≡ 1 mod 4)"


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q_ij = χ(j − i): the quadratic character mod the prime q."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> Tensor | None:
    """A Hadamard matrix of order m from Paley's constructions, or None if they give none."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:                       # Paley I: H = I + S, S skew
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:        # Paley II: blow up the symmetric core
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, sign_block) + torch.kron((c == 0).double(), zero_block)
    return None


@functools.lru_cache(maxsize=None)
def _construct(n: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order n from Sylvester ⊗ Paley, or None if these give none."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    # Try the smallest Paley core first: n = 2^j · m for m = n / 2^j, j from large to small.
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    p = power
    while p >= 1:
        m = n // p
        core = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if core is not None:
            h = core
            while h.shape[0] < n:
                h = torch.kron(sylvester, h)
            return h
        p //= 2
    return None


def has_hadamard_matrix(n: int) -> bool:
    return n >= 1 and _construct(n) is not None


def hadamard_matrix(n: int) -> Tensor:
    """An unnormalised ±1 Hadamard matrix of order n (H Hᵀ = n I), float64."""
    h = _construct(n) if n >= 1 else None
    if h is None:
        raise MQExportError(f"no Hadamard matrix of order {n} is constructed here: supported orders are "
                            f"{SUPPORTED_ORDERS}")
    return h


def random_hadamard(n: int, generator: torch.Generator) -> Tensor:
    """Orthogonal random-sign Hadamard rotation diag(±1)·H/√n (float64), signs from `generator`."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).double() * 2 - 1
    return signs[:, None] * hadamard_matrix(n) / n ** 0.5
