"""[Note: low-precision placements against a float32 reference] (torch_collage/precision.py)."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from torch_collage.precision import float32_outputs, within_reference


def _block(x: torch.Tensor, w: torch.Tensor, low: torch.dtype = torch.bfloat16) -> torch.Tensor:
    h = (x @ w).to(low).relu()  # an explicit cast, as HF models have them
    return torch.nn.functional.layer_norm(h @ w, (w.shape[1],)).sum(-1, keepdim=True) + h[:, :1]


def test_the_reference_is_the_graph_in_float32() -> None:
    """Every bfloat16 value and dtype argument is raised: the outputs are float32 and equal the
    function run on float32 inputs, and closer to a float64 run than the bfloat16 run is."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 64, generator=g), torch.randn(64, 64, generator=g) / 8
    gm = make_fx(lambda a, b: _block(a, b))(x.bfloat16(), w.bfloat16())
    (ref,) = float32_outputs(gm, [x.bfloat16(), w.bfloat16()])
    assert ref.dtype == torch.float32
    exact = _block(x.bfloat16().double(), w.bfloat16().double(), torch.float64)  # what float32 approximates
    low = gm(x.bfloat16(), w.bfloat16())
    assert low.dtype == torch.bfloat16
    assert (ref.double() - exact).abs().max() < 0.1 * (low.double() - exact).abs().max()


def test_a_placement_passes_within_twice_eager_s_error_and_a_wrong_one_fails() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(8, 32, generator=g) * 3
    noise = torch.randn(8, 32, generator=g) * 0.05
    want = (ref + noise).bfloat16()  # eager: off the reference by its rounding
    close = (ref - 1.5 * noise).bfloat16()  # another rounding, 1.5x as far
    assert within_reference([close], [want], [ref], rtol=1e-2, atol=1e-3) == ""
    wrong = close.clone()
    wrong[2, 3] += 4.0  # one wrong element at the output's scale
    assert "from the float32 reference" in within_reference([wrong], [want], [ref], rtol=1e-2, atol=1e-3)
    far = (ref + 4 * noise).bfloat16()
    assert "from the float32 reference" in within_reference([far], [want], [ref], rtol=1e-2, atol=1e-3)
    ints = torch.arange(4)
    assert within_reference([ints + 1], [ints], [ints], rtol=1e-2, atol=1e-3) == ""  # judged elsewhere


def test_a_reference_of_another_shape_is_no_reference() -> None:
    want = torch.randn(4, 8).bfloat16()
    reason = within_reference([want], [want], [torch.randn(8, 4)], rtol=1e-2, atol=1e-3)
    assert "no float32 reference" in reason
