"""Non-local blocks against naive loop-over-tokens references written here, plus edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from lungnlb.blocks import VARIANTS, NonLocalBlock2d, grid_to_tokens, locality_weights, symmetry_gate, tokens_to_grid
from lungnlb.networks.inference_form import inference_form


def randomise(block: NonLocalBlock2d, seed: int = 0) -> NonLocalBlock2d:
    """Give every parameter (W included, which starts at zero) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return block


def naive_dist(i: int, j: int, grid: int, distance: str) -> float:
    row_gap, col_gap = abs(i // grid - j // grid), abs(i % grid - j % grid)
    gap = min(row_gap, col_gap) if distance == "paper" else max(row_gap, col_gap)
    return 1.0 / max(gap, 1)


def naive_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = math.sqrt(float((a * a).sum())) * math.sqrt(float((b * b).sum()))
    return 0.0 if norm == 0 else float((a * b).sum()) / norm


def naive_block(block: NonLocalBlock2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's formulas, token by token, in float64 (one sample)."""
    x = x.double()[0]
    channels, height, width = x.shape
    n, inner = block.grid, block.inner_channels
    ph, pw = height // n, width // n
    qkv_w = block.qkv.weight.double()[:, :, 0, 0]
    qkv_b = block.qkv.bias.double()

    def pointwise(weight, bias, fmap):
        out = torch.einsum("oc,chw->ohw", weight, fmap)
        return out if bias is None else out + bias[:, None, None]

    def cell(fmap, i):
        r, c = divmod(i, n)
        return fmap[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]

    f = pointwise(qkv_w[:inner], qkv_b[:inner], x)
    g = pointwise(qkv_w[inner : 2 * inner], qkv_b[inner : 2 * inner], x)
    h = pointwise(qkv_w[2 * inner :], qkv_b[2 * inner :], x)
    tokens = n * n
    d_k = inner * ph * pw
    logits = torch.zeros(tokens, tokens, dtype=torch.float64)
    for i in range(tokens):
        for j in range(tokens):
            logits[i, j] = (cell(f, i) * cell(g, j)).sum() / math.sqrt(d_k)
            if block.localized:
                logits[i, j] *= naive_dist(i, j, n, block.distance)
    attention = torch.softmax(logits, dim=1)
    mixed = torch.zeros(inner, height, width, dtype=torch.float64)
    for i in range(tokens):
        total = sum(attention[i, j] * cell(h, j) for j in range(tokens))
        if block.symmetric:
            x_cell = cell(x, i)
            total = total * naive_cosine(x_cell[:, : ph // 2], x_cell[:, ph - ph // 2 :])
        r, c = divmod(i, n)
        mixed[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = total
    out = pointwise(block.out.weight.double()[:, :, 0, 0], block.out.bias.double(), mixed)
    y = pointwise(block.residual.weight.double()[:, :, 0, 0], None, out) + x
    return y[None], attention[None]


CASES = [(variant, "paper") for variant in VARIANTS] + [("localized", "chebyshev"), ("symmetry_localized", "chebyshev")]


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "inference_form"])  # inference_form: fused W v
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("variant,distance", CASES)
@pytest.mark.parametrize("height,width,grid", [(12, 12, 3), (15, 9, 3)])  # second: odd cell height 5
def test_block_matches_naive_reference(variant, distance, height, width, grid, memory_format, fast):
    block = randomise(NonLocalBlock2d(6, grid=grid, variant=variant, inner_channels=4, distance=distance))
    block = inference_form(block) if fast else block
    x = torch.randn(1, 6, height, width, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=memory_format)
    with torch.set_grad_enabled(not fast):
        y, attention = block(x, return_attention=True)
    expected_y, expected_attention = naive_block(block, x)
    torch.testing.assert_close(attention.double(), expected_attention, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double(), expected_y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_gives_the_same_gradients_as_nchw(variant):
    block = randomise(NonLocalBlock2d(8, grid=4, variant=variant))
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        block.zero_grad()
        x_in = x.clone().contiguous(memory_format=memory_format).requires_grad_(True)
        y = block(x_in)
        assert y.is_contiguous(memory_format=memory_format)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append([x_in.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for nchw, nhwc in zip(*grads):
        torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_is_identity_at_initialisation(variant):
    x = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(NonLocalBlock2d(8, grid=4, variant=variant)(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_reaches_w_and_every_projection_after_one_step(variant):
    torch.manual_seed(0)
    block = NonLocalBlock2d(8, grid=4, variant=variant, inner_channels=4)
    x, target = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    optimiser = torch.optim.SGD(block.parameters(), lr=0.1)

    def step():
        optimiser.zero_grad()
        ((block(x) - target) ** 2).mean().backward()

    step()
    assert block.residual.weight.grad.abs().sum() > 0, "W gets no gradient at the first step"
    optimiser.step()
    step()
    inner = block.inner_channels
    grads = {
        "W": block.residual.weight.grad,
        "v (out)": block.out.weight.grad,
        "f (query)": block.qkv.weight.grad[:inner],
        "g (key)": block.qkv.weight.grad[inner : 2 * inner],
        "h (value)": block.qkv.weight.grad[2 * inner :],
    }
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name} gets no gradient after one optimiser step"


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_rows_sum_to_one(variant):
    block = randomise(NonLocalBlock2d(4, grid=4, variant=variant))
    _, attention = block(torch.randn(3, 4, 16, 16), return_attention=True)
    assert attention.shape == (3, 16, 16)
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(3, 16))
    assert (attention >= 0).all()


def test_locality_weights_paper_by_hand():
    # 3x3 grid: cells 0..8 row-major. min(|dr|, |dc|) is 2 only for opposite corners (0-8, 2-6).
    expected = torch.ones(9, 9)
    for i, j in [(0, 8), (8, 0), (2, 6), (6, 2)]:
        expected[i, j] = 0.5
    torch.testing.assert_close(locality_weights(3), expected)


def test_locality_weights_chebyshev_by_hand():
    weights = locality_weights(3, distance="chebyshev")
    # from cell 0 = (0, 0) to (0,0) (0,1) (0,2) (1,0) (1,1) (1,2) (2,0) (2,1) (2,2)
    torch.testing.assert_close(weights[0], torch.tensor([1, 1, 0.5, 1, 1, 0.5, 0.5, 0.5, 0.5]))
    # the centre cell touches every other cell
    torch.testing.assert_close(weights[4], torch.ones(9))
    torch.testing.assert_close(weights, weights.T)


def test_locality_weights_rejects_unknown_distance():
    with pytest.raises(ValueError, match="distance"):
        locality_weights(3, distance="euclid")


def cell_map(top: torch.Tensor, bottom: torch.Tensor, middle: torch.Tensor | None = None) -> torch.Tensor:
    """One cell (1, C, rows, W) from its halves (and optional middle row)."""
    parts = [top, bottom] if middle is None else [top, middle, bottom]
    return torch.cat(parts, dim=2)


@pytest.mark.parametrize("with_middle_row", [False, True])
def test_symmetry_gate_equal_negated_and_zero_halves(with_middle_row):
    top = torch.randn(1, 3, 2, 4)
    middle = torch.randn(1, 3, 1, 4) if with_middle_row else None
    equal = cell_map(top, top.clone(), middle)
    negated = cell_map(top, -top, middle)
    zero = torch.zeros_like(equal)
    x = torch.cat([torch.cat([equal, negated], dim=3), torch.cat([zero, equal], dim=3)], dim=2)  # 2x2 grid of cells
    theta = symmetry_gate(x, grid=2)
    torch.testing.assert_close(theta, torch.tensor([[1.0, -1.0, 0.0, 1.0]]))


def test_symmetry_gate_same_in_channels_last():
    x = torch.randn(2, 5, 12, 12, generator=torch.Generator().manual_seed(3))
    gate = symmetry_gate(x, 3)
    torch.testing.assert_close(symmetry_gate(x.contiguous(memory_format=torch.channels_last), 3), gate)
    x_cell = x[1, :, 4:8, 8:12]  # cell (row 1, col 2) of sample 1, cell height 4
    assert math.isclose(float(gate[1, 5]), naive_cosine(x_cell[:, :2], x_cell[:, 2:]), rel_tol=1e-5)


@pytest.mark.parametrize("scale", [1e25, 1e-25])
def test_symmetry_gate_is_scale_invariant_where_squares_overflow_or_underflow(scale):
    # squares of 1e25 overflow float32 and squares of 1e-25 underflow: the gate rescales and agrees
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(symmetry_gate(x * scale, 2), symmetry_gate(x, 2), rtol=1e-4, atol=1e-5)


def test_symmetry_gate_zero_half_gives_zero_not_nan():
    x = torch.zeros(1, 2, 4, 4)
    x[:, :, :2] = torch.randn(1, 2, 2, 4)  # bottom half all zero
    theta = symmetry_gate(x, grid=1)
    assert torch.equal(theta, torch.zeros(1, 1))


def test_tokens_are_cells_in_row_major_order():
    grid = 3
    x = torch.arange(grid * grid, dtype=torch.float32).reshape(1, 1, grid, grid)
    x = x.repeat_interleave(2, dim=2).repeat_interleave(4, dim=3).repeat(1, 2, 1, 1)  # cells 2x4, 2 channels
    tokens = grid_to_tokens(x, grid)
    assert tokens.shape == (1, 9, 2 * 2 * 4)
    for index in range(9):
        assert torch.all(tokens[0, index] == index)
    assert torch.equal(tokens_to_grid(tokens, grid, 2, 6, 12), x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scale", [0.0, 1.0, 1e20])
def test_no_nan_or_inf_in_float32(variant, scale):
    block = randomise(NonLocalBlock2d(4, grid=2, variant=variant))
    y, attention = block(scale * torch.randn(2, 4, 8, 8), return_attention=True)
    assert torch.isfinite(y).all() and torch.isfinite(attention).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scale", [0.0, 100.0])
def test_no_nan_or_inf_under_autocast(dtype, variant, scale):
    block = randomise(NonLocalBlock2d(8, grid=4, variant=variant))
    with torch.autocast(device_type="cpu", dtype=dtype):
        y, attention = block(scale * torch.randn(2, 8, 32, 32), return_attention=True)
    assert attention.dtype == torch.float32
    assert torch.isfinite(y.float()).all() and torch.isfinite(attention).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 16))


def test_map_not_divisible_by_grid_is_rejected_with_sizes():
    with pytest.raises(ValueError, match=r"30x30.*8"):
        NonLocalBlock2d(4, grid=8)(torch.randn(1, 4, 30, 30))


def test_symmetry_needs_cells_two_rows_tall():
    with pytest.raises(ValueError, match="half"):
        NonLocalBlock2d(4, grid=8, variant="symmetry")(torch.randn(1, 4, 8, 8))


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        NonLocalBlock2d(4, variant="global")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_reaches_the_input(variant):
    block = randomise(NonLocalBlock2d(4, grid=2, variant=variant))
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    block(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
