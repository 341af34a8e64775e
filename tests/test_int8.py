"""Int8 linear layers: close to float, and a token's output independent of the other rows of its forward."""
from __future__ import annotations

import pytest
import torch

from app.engine import loader
from app.engine.int8 import Int8Linear, quantize_int8

pytestmark = pytest.mark.skipif(not loader.int8_supported(), reason="no quantized engine in this torch build")


def rows_of_mixed_magnitude(count: int, features: int) -> torch.Tensor:
    """Random rows whose scales differ by up to a thousandfold, as tokens of one batch do."""
    generator = torch.Generator().manual_seed(7)
    scales = torch.logspace(-1.5, 1.5, count)[torch.randperm(count, generator=generator)]
    return torch.randn(count, features, generator=generator) * scales[:, None]


def test_each_rows_output_is_the_same_whatever_else_is_in_the_forward():
    linear = torch.nn.Linear(96, 40)
    layer = Int8Linear(linear)
    x = rows_of_mixed_magnitude(37, 96)
    with torch.inference_mode():
        alone = torch.cat([layer(row[None]) for row in x])
        for size in (2, 5, 16, 37):
            assert torch.equal(layer(x[:size]), alone[:size])
        assert torch.equal(layer(x[None, :9]), alone[None, :9])  # [batch, tokens, features] as the models call it


def test_output_is_within_int8_error_of_the_float_layer_for_small_and_large_rows():
    linear = torch.nn.Linear(256, 64)
    layer = Int8Linear(linear)
    x = rows_of_mixed_magnitude(16, 256)
    with torch.inference_mode():
        want, got = linear(x), layer(x)
    relative = (got - want).norm(dim=-1) / want.norm(dim=-1)
    # A shared scale for the whole input gave the small rows of such a batch up to 92% error.
    assert float(relative.max()) < 0.05


def test_quantize_int8_replaces_every_linear_and_keeps_bias_and_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(16, 4,
                                                                                                            bias=False)))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        want = model(x)
        quantize_int8(model)
        got = model(x)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert got.shape == want.shape and torch.allclose(got, want, atol=0.05, rtol=0.05)
    assert model[0].bias is not None and model[2][0].bias is None
    assert model[0].weight_bytes() == 16 * (8 + 2) + 16 * 8 + 16 * 4


def test_an_all_zero_row_gives_the_bias():
    linear = torch.nn.Linear(12, 5)
    with torch.inference_mode():
        assert torch.allclose(Int8Linear(linear)(torch.zeros(1, 12)), linear.bias[None])
