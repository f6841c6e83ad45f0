"""A MixedOp's (or a Cell's, or a Network's) ``weights`` of the wrong count, shape, dtype or device: ValueError
naming ``weights`` with the expected and received counts, on the fused path (the C++ edge) and the module path.
"""
from __future__ import annotations

import pytest
import torch

import pynas
from pynas.cnn.model_search import Cell, MixedOp
from pynas.cnn.operations import PRIMITIVES

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_OK = pynas.backends()["cpu"] is None
# the module path everywhere; the fused C++ edge where the extension is built
PATHS = ["reference"] + (["cpu"] if CPU_OK else [])


def _edge(C=4, stride=1):
    torch.manual_seed(0)
    return MixedOp(C, stride).train(), torch.randn(2, C, 6, 6)


def _w(n, *, dtype=torch.float32, device="cpu"):
    return torch.softmax(torch.randn(n, dtype=torch.float64), 0).to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("n", [len(PRIMITIVES) - 1, len(PRIMITIVES) + 1, 1, 0], ids=lambda n: f"{n}-weights")
def test_mixed_op_wrong_weight_count(backend, n):
    """7 weights raised a bare IndexError on the fused path (index out of range in self) and a message about
    6 of 7 live candidates on the module path; a 9th weight was silently ignored on both."""
    op, x = _edge()
    with pynas.use_backend(backend):
        with pytest.raises(ValueError, match=rf"^weights: expected {len(PRIMITIVES)} weights .* got {n} "):
            op(x, _w(n))


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("case", ["2-D", "scalar", "int64", "bool", "meta-device"])
def test_mixed_op_weights_shape_dtype_device(backend, case):
    op, x = _edge()
    n = len(PRIMITIVES)
    weights = {
        "2-D": _w(n).reshape(1, n),
        "scalar": torch.tensor(1.0),
        "int64": torch.ones(n, dtype=torch.int64),
        "bool": torch.ones(n, dtype=torch.bool),
        "meta-device": torch.ones(n, device="meta"),
    }[case]
    with pynas.use_backend(backend):
        with pytest.raises(ValueError, match=rf"^weights: expected {n} weights \(a 1-D floating tensor on cpu"):
            op(x, weights)


def test_mixed_op_weights_not_a_tensor():
    op, x = _edge()
    with pytest.raises(TypeError, match="^weights: expected a tensor"):
        op(x, [1.0 / len(PRIMITIVES)] * len(PRIMITIVES))


@pytest.mark.parametrize("backend", PATHS)
def test_mixed_op_right_weights_still_run(backend):
    """The check passes the right weights (float64 weights with float32 x included: any floating dtype)."""
    op, x = _edge()
    with pynas.use_backend(backend):
        assert op(x, _w(len(PRIMITIVES))).shape == x.shape
        assert op(x, _w(len(PRIMITIVES), dtype=torch.float64)).shape == x.shape


@pytest.mark.parametrize("backend", PATHS)
def test_mixed_op_custom_primitives_count(backend):
    prims = ["none", "skip_connect", "avg_pool_3x3"]
    torch.manual_seed(0)
    op, x = MixedOp(4, 1, prims).train(), torch.randn(2, 4, 6, 6)
    with pynas.use_backend(backend):
        assert op(x, _w(3)).shape == x.shape
        with pytest.raises(ValueError, match="^weights: expected 3 weights .* got 8 "):
            op(x, _w(8))


@pytest.mark.parametrize("rows", [13, 15])
def test_cell_wrong_edge_count(rows):
    """A cell of 4 steps has 14 edges: 13 rows raised IndexError, 15 silently ignored the last."""
    torch.manual_seed(0)
    cell = Cell(4, 4, 4, 4, 4, False, False).train()
    s0 = s1 = torch.randn(2, 4, 6, 6)
    w = torch.softmax(torch.randn(rows, len(PRIMITIVES)), -1)
    with pytest.raises(ValueError, match=rf"^weights: expected a 2-D tensor .* 14 rows, got \({rows}, 8\)"):
        cell(s0, s1, w)
    with pytest.raises(ValueError, match="^weights: expected 8 weights .* got 7 "):
        cell(s0, s1, torch.softmax(torch.randn(14, 7), -1))


def test_network_with_wrong_alphas():
    from pynas.cnn import Network

    torch.manual_seed(0)
    net = Network(4, 10, 1, steps=2, multiplier=2, stem_multiplier=1)
    x = torch.randn(2, 3, 8, 8)
    assert net(x).shape == (2, 10)
    for a in net.arch_parameters():  # (a single cell is a reduction cell)
        a.data = a.data[:, :7].clone()
    with pytest.raises(ValueError, match="^weights: expected 8 weights .* got 7 "):
        net(x)
