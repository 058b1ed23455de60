"""ElasticLowRankLinear: SVD placement, Eckart-Young slices, view-only forward, static twins."""

import pytest
import torch
from torch import nn

from flora_ray.core.lowrank import ElasticLowRankLinear, build_static_layer, factorize, low_rank_is_cheaper


def _linear(d_in, d_out, bias=True):
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    nn.init.normal_(layer.weight)
    return layer


@pytest.mark.parametrize(("d_in", "d_out"), [(24, 72), (72, 24), (32, 32)])
@pytest.mark.parametrize("placement", ["faithful", "sqrt"])
def test_factors_reproduce_weight_and_place_singular_values(d_in, d_out, placement):
    weight = _linear(d_in, d_out).weight.detach()
    u, vt = factorize(weight, placement)
    k = min(d_in, d_out)
    assert u.shape == (d_out, k) and vt.shape == (k, d_in)
    torch.testing.assert_close(u @ vt, weight, rtol=1e-10, atol=1e-10)
    s = torch.linalg.svdvals(weight)
    u_norms, v_norms = u.norm(dim=0), vt.norm(dim=1)
    if placement == "sqrt":
        torch.testing.assert_close(u_norms, s.sqrt())
        torch.testing.assert_close(v_norms, s.sqrt())
    elif d_out >= d_in:  # qkv, fc1 (and square layers): S goes into V^T, U = P is orthonormal
        torch.testing.assert_close(v_norms, s)
        torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=u.dtype))
    else:  # fc2: S goes into U
        torch.testing.assert_close(u_norms, s)
        torch.testing.assert_close(vt @ vt.T, torch.eye(k, dtype=u.dtype))


@pytest.mark.parametrize("placement", ["faithful", "sqrt"])
def test_rank_slice_is_best_rank_r_approximation(placement):
    dense = _linear(40, 120)
    layer = ElasticLowRankLinear.from_linear(dense, placement)
    p, s, qh = torch.linalg.svd(dense.weight.detach())
    for r in (1, 5, 17, 40):
        u, vt = layer.factors(r)
        best = p[:, :r] @ torch.diag(s[:r]) @ qh[:r]
        torch.testing.assert_close(u @ vt, best, rtol=1e-9, atol=1e-9)
        # Eckart-Young: the Frobenius error is the norm of the dropped singular values.
        error = torch.linalg.norm(dense.weight.detach() - u @ vt)
        torch.testing.assert_close(error, s[r:].norm(), rtol=1e-9, atol=1e-9)


def test_full_rank_layer_equals_dense_in_float32():
    dense = nn.Linear(64, 192)
    layer = ElasticLowRankLinear.from_linear(dense)
    x = torch.randn(8, 10, 64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_forward_slices_views_not_copies():
    layer = ElasticLowRankLinear.from_linear(nn.Linear(48, 96))
    layer.set_rank(12)
    u, vt = layer.factors()
    assert u.data_ptr() == layer.u.data_ptr() and vt.data_ptr() == layer.vt.data_ptr()
    assert u.shape == (96, 12) and vt.shape == (12, 48)
    assert u.untyped_storage().data_ptr() == layer.u.untyped_storage().data_ptr()


@pytest.mark.parametrize("rank", [3, 20, 48])
def test_forward_matches_factor_formula_on_both_paths(rank):
    dense = _linear(48, 96)
    layer = ElasticLowRankLinear.from_linear(dense)
    layer.set_rank(rank)
    x = torch.randn(5, 48, dtype=torch.float64)
    u, vt = layer.factors()
    expected = x @ vt.T @ u.T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    # 48*(48+96) > 48*96 at rank 48 and 20*144 < 4608 at 20: both code paths are exercised.
    assert low_rank_is_cheaper(48, 96, 20) and not low_rank_is_cheaper(48, 96, 48)


@pytest.mark.parametrize("rank", [4, 40])
def test_gradients_reach_only_the_active_slice(rank):
    layer = ElasticLowRankLinear.from_linear(nn.Linear(48, 96))
    layer.set_rank(rank)
    layer(torch.randn(3, 48)).sum().backward()
    assert layer.u.grad[:, :rank].abs().sum() > 0 and layer.vt.grad[:rank].abs().sum() > 0
    assert layer.u.grad[:, rank:].abs().sum() == 0 and layer.vt.grad[rank:].abs().sum() == 0


@pytest.mark.parametrize(("rank", "kind"), [(5, nn.Sequential), (31, nn.Sequential), (32, nn.Linear), (48, nn.Linear)])
def test_static_twin_form_and_equality(rank, kind):
    layer = ElasticLowRankLinear.from_linear(nn.Linear(48, 96))
    layer.set_rank(rank)
    static = layer.to_static()
    assert type(static) is kind
    x = torch.randn(7, 48)
    torch.testing.assert_close(static(x), layer(x), rtol=1e-5, atol=1e-5)
    empty = build_static_layer(48, 96, rank, bias=True)
    assert type(empty) is kind
    assert [p.shape for p in empty.parameters()] == [p.shape for p in static.parameters()]
    if kind is nn.Sequential:
        assert static[0].weight.shape == (rank, 48) and static[1].weight.shape == (96, rank)


def test_break_even_tie_goes_to_dense():
    # 768 -> 2304 at rank 576: 576 * 3072 == 768 * 2304.
    assert not low_rank_is_cheaper(768, 2304, 576)
    assert low_rank_is_cheaper(768, 2304, 575)


@pytest.mark.parametrize("bad", [0, -1, 49, 2.5, True, "8"])
def test_set_rank_out_of_range_is_a_clear_error(bad):
    layer = ElasticLowRankLinear.from_linear(nn.Linear(48, 96))
    with pytest.raises(ValueError, match=r"rank=.* out of range: this layer allows integers 1\.\.48"):
        layer.set_rank(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sv_placement='half'"):
        factorize(torch.randn(4, 4), "half")
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        ElasticLowRankLinear.from_linear(nn.Conv2d(3, 3, 1))


def test_no_bias_layer():
    dense = nn.Linear(16, 8, bias=False)
    layer = ElasticLowRankLinear.from_linear(dense)
    assert layer.bias is None
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    layer.set_rank(3)
    assert layer.to_static()[1].bias is None
