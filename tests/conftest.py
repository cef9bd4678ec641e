import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_scan_inputs(b=2, d=6, n=4, length=23, dtype=torch.float32):
    """Inputs in mamba-ssm's layout with realistic signs: A < 0, Δ around softplus's knee."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(u=r(b, d, length), delta=r(b, d, length) * 0.5, A=-torch.rand(d, n, generator=g, dtype=dtype) * 2,
                B=r(b, n, length), C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d) * 0.1)
