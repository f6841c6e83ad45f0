"""CAS's weight penalties (pynas.strategies.cas_penalties) against plain references written here (loops over rows
and entries, explicit gradient formulas), in float64: block sparsity, orthogonality, the continual penalty with its
frozen copy, the first-task penalty, CAS's condition-2 parameter selection, and the errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pynas.rnn.genotypes import PUBLISHED, Genotype
from pynas.rnn.model_eval import RNNModel
from pynas.strategies import cas_penalties as cp

D = torch.float64


def rows_of(t):
    """The rows of a tensor's matrix as lists of floats: along the first dimension, the rest flattened."""
    t = t.detach()
    return [[float(x) for x in t[i].reshape(-1)] for i in range(t.shape[0])]


def ref_block(tensors):
    total = 0.0
    for t in tensors:
        if t.dim() >= 2:
            for row in rows_of(t):
                total += math.sqrt(sum(x * x for x in row))
        else:
            total += sum(abs(float(x)) for x in t.detach().reshape(-1))
    return total


def ref_block_grad(t):
    """d/dt of the tensor's block term: row / ||row|| (0 for a zero row); sign(v) for a vector."""
    if t.dim() < 2:
        return torch.sign(t)
    g = torch.zeros_like(t)
    for i in range(t.shape[0]):
        n = math.sqrt(sum(x * x for x in rows_of(t)[i]))
        if n > 0:
            g[i] = t[i] / n
    return g


def ref_ortho(params, previous):
    total = 0.0
    for p, q in zip(params, previous):
        if p.dim() >= 2:
            d, w1 = rows_of(p - q), rows_of(q)
            cols_d = len(d[0]) if d else 0
            cols_w = len(w1[0]) if w1 else 0
            m = [[sum(d[r][a] * w1[r][b] for r in range(len(d))) for b in range(cols_w)] for a in range(cols_d)]
            total += math.sqrt(sum(x * x for row in m for x in row))
        else:
            pairs = zip(p.detach().reshape(-1).tolist(), q.detach().reshape(-1).tolist())
            total += math.sqrt(sum(((a - b) * b) ** 2 for a, b in pairs))
    return total


def ref_ortho_grad(p, q):
    """d/dp of ||(P - Q)^T Q||_F = Q M^T / ||M||_F with M = (P - Q)^T Q (matrices); g * q / ||g|| with
    g = (p - q) * q (vectors); 0 where the norm is 0."""
    if p.dim() >= 2:
        P, Q = p.reshape(p.shape[0], -1), q.reshape(q.shape[0], -1)
        M = (P - Q).t() @ Q
        n = M.norm()
        return (Q @ M.t() / n).reshape(p.shape) if n > 0 else torch.zeros_like(p)
    g = (p - q) * q
    n = g.norm()
    return g * q / n if n > 0 else torch.zeros_like(p)


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=D)


SHAPES = [(4, 3), (5,), (2, 3, 2), (3, 1, 2, 2), (), (1, 6), (6, 1)]


# ---------------------------------------------------------------------------------------------- block sparsity


def test_block_sparsity_value_and_gradient():
    ts = [rand(*s, seed=i).requires_grad_() for i, s in enumerate(SHAPES)]
    value = cp.block_sparsity(ts)
    assert value.dim() == 0 and value.dtype == D
    assert value.item() == pytest.approx(ref_block(ts), rel=1e-12)
    grads = torch.autograd.grad(value, ts)
    for t, g in zip(ts, grads):
        assert torch.allclose(g, ref_block_grad(t.detach()), rtol=1e-12, atol=1e-14)


def test_block_sparsity_rows_are_along_the_first_dimension():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=D)
    assert cp.block_sparsity([w]).item() == pytest.approx(5.0 + 0.0 + 1.0)
    assert cp.block_sparsity([w.t()]).item() == pytest.approx(math.sqrt(10.0) + 4.0)
    assert cp.block_sparsity([torch.tensor([-1.5, 2.0, 0.0], dtype=D)]).item() == pytest.approx(3.5)
    assert cp.block_sparsity([torch.tensor(-2.0, dtype=D)]).item() == pytest.approx(2.0)
    t3 = rand(2, 3, 4, seed=7)  # rows of 12: the dims after the first flattened, not torch's norm over dim 1
    assert cp.block_sparsity([t3]).item() == pytest.approx(t3.reshape(2, 12).norm(dim=1).sum().item(), rel=1e-12)
    assert cp.block_sparsity([t3]).item() != pytest.approx(t3.norm(p=2, dim=1).sum().item(), rel=1e-6)


def test_block_sparsity_zero_rows_zero_size_and_empty():
    w = torch.zeros(3, 4, dtype=D, requires_grad=True)
    v = torch.zeros(4, dtype=D, requires_grad=True)
    value = cp.block_sparsity([w, v])
    assert value.item() == 0.0
    gw, gv = torch.autograd.grad(value, [w, v])
    assert not torch.isnan(gw).any() and gw.abs().sum() == 0 and gv.abs().sum() == 0
    empties = [torch.zeros(0, 5, dtype=D, requires_grad=True), torch.zeros(5, 0, dtype=D, requires_grad=True),
               torch.zeros(0, dtype=D, requires_grad=True), torch.zeros(2, 0, 3, dtype=D, requires_grad=True)]
    value = cp.block_sparsity(empties)
    assert value.item() == 0.0 and value.dtype == D
    for t, g in zip(empties, torch.autograd.grad(value, empties)):
        assert g.shape == t.shape
    assert cp.block_sparsity([]).item() == 0.0 and cp.block_sparsity(iter(())).dim() == 0


# ---------------------------------------------------------------------------------------------- orthogonality


def test_orthogonality_value_and_gradient_to_params_only():
    prev = [rand(*s, seed=10 + i) for i, s in enumerate(SHAPES)]
    params = [(q + 0.3 * rand(*q.shape, seed=20 + i)).requires_grad_() for i, q in enumerate(prev)]
    prev_leaf = [q.clone().requires_grad_() for q in prev]
    value = cp.orthogonality(params, prev_leaf)
    assert value.dim() == 0 and value.dtype == D
    assert value.item() == pytest.approx(ref_ortho(params, prev), rel=1e-12)
    grads = torch.autograd.grad(value, params + prev_leaf, allow_unused=True)
    for p, q, g in zip(params, prev, grads[:len(params)]):
        assert torch.allclose(g, ref_ortho_grad(p.detach(), q), rtol=1e-10, atol=1e-12)
    assert all(g is None for g in grads[len(params):])  # previous is a constant


def test_orthogonality_explicit_small_case():
    w1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D)
    w = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=D)  # change [[0, 1], [0, 0]]; change^T W1 = [[0, 0], [1, 0]]
    assert cp.orthogonality([w], [w1]).item() == pytest.approx(1.0)  # Frobenius norm, not squared
    v1, v = torch.tensor([3.0, -1.0], dtype=D), torch.tensor([4.0, 1.0], dtype=D)  # (v - v1) * v1 = [3, -2]
    assert cp.orthogonality([v], [v1]).item() == pytest.approx(math.sqrt(13.0))
    assert cp.orthogonality([w, v], [w1, v1]).item() == pytest.approx(1.0 + math.sqrt(13.0))


def test_orthogonality_at_the_previous_values_is_zero_with_zero_gradient():
    prev = [rand(*s, seed=30 + i) for i, s in enumerate(SHAPES)]
    params = [q.clone().requires_grad_() for q in prev]
    value = cp.orthogonality(params, prev)
    assert value.item() == 0.0
    for g in torch.autograd.grad(value, params):
        assert not torch.isnan(g).any() and g.abs().sum() == 0


def test_orthogonality_zero_size():
    shapes = [(0, 5), (5, 0), (0,), (2, 0, 3), (0, 2, 2)]
    params = [torch.zeros(*s, dtype=D, requires_grad=True) for s in shapes]
    value = cp.orthogonality(params, [torch.zeros(*s, dtype=D) for s in shapes])
    assert value.item() == 0.0
    assert [g.shape for g in torch.autograd.grad(value, params)] == [p.shape for p in params]
    assert cp.orthogonality([], []).item() == 0.0


def test_penalty_function_errors():
    a = rand(3, 2, seed=1)
    for call, arg in [(lambda: cp.block_sparsity(a), "params"), (lambda: cp.block_sparsity([a, 3.0]), "params"),
                      (lambda: cp.block_sparsity([torch.ones(2, dtype=torch.long)]), "params"),
                      (lambda: cp.block_sparsity(None), "params"),
                      (lambda: cp.orthogonality([a], [a, a]), "previous"),
                      (lambda: cp.orthogonality([a], [a.t()]), "previous"),
                      (lambda: cp.orthogonality([a], a), "previous"),
                      (lambda: cp.orthogonality(["x"], [a]), "params")]:
        with pytest.raises(ValueError, match=f"^{arg}: expected"):
            call()


# ---------------------------------------------------------------------------------------- the model penalties


class Net(nn.Module):
    """A 2-D weight and a bias (nn.Linear), a 3-D and a 0-d parameter, an embedding tied to a decoder."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(4, 3).to(D)
        self.conv = nn.Parameter(torch.randn(2, 3, 2, generator=g, dtype=D))
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=D))
        self.emb = nn.Embedding(6, 3).to(D)
        self.dec = nn.Linear(3, 6).to(D)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        h = self.lin(torch.cat([x, x[..., :1]], -1)) * self.scale + self.conv.sum()
        return self.dec(h)


NAMES = ["conv", "scale", "lin.weight", "lin.bias", "emb.weight", "dec.bias"]  # named_parameters order


def _perturb(model, seed):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.2 * rand(*p.shape, seed=seed + i))


def test_continual_penalty_is_zero_with_zero_gradient_at_the_copy():
    model = Net()
    pen = cp.ContinualPenalty(model, lambda_bs=0.5, lambda_o=2.0)
    assert pen.names == tuple(NAMES)  # the tied decoder weight once, under its first name
    value = pen()
    assert value.dim() == 0 and value.item() == 0.0
    bs, ortho = pen.terms()
    assert bs.item() == 0.0 and ortho.item() == 0.0
    grads = torch.autograd.grad(value, list(model.parameters()))
    for g in grads:
        assert not torch.isnan(g).any() and g.abs().sum() == 0


def test_continual_penalty_value_and_gradient():
    model = Net()
    lambda_bs, lambda_o = 0.3, 1.7
    pen = cp.ContinualPenalty(model, lambda_bs, lambda_o)
    prev = {n: p.detach().clone() for n, p in model.named_parameters()}
    _perturb(model, seed=100)
    params = dict(model.named_parameters())
    theta = [params[n] for n in NAMES]
    theta1 = [prev[n] for n in NAMES]
    value = pen()
    changes = [t.detach() - q for t, q in zip(theta, theta1)]
    expected = lambda_bs * ref_block(changes) + lambda_o * ref_ortho([t.detach() for t in theta], theta1)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    bs, ortho = pen.terms()
    assert bs.item() == pytest.approx(ref_block(changes), rel=1e-12)
    assert ortho.item() == pytest.approx(ref_ortho([t.detach() for t in theta], theta1), rel=1e-12)
    grads = torch.autograd.grad(value, theta)
    for t, q, c, g in zip(theta, theta1, changes, grads):
        want = lambda_bs * ref_block_grad(c) + lambda_o * ref_ortho_grad(t.detach(), q)
        assert torch.allclose(g, want, rtol=1e-10, atol=1e-12)
    for q in pen.previous.values():
        assert not q.requires_grad and q.grad is None


def test_continual_penalty_copy_stays_frozen_while_training():
    model = Net()
    pen = cp.ContinualPenalty(model)
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(pen.previous[n].data_ptr() != p.data_ptr() for n, p in model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for _ in range(3):
        opt.zero_grad()
        loss = model(ids).pow(2).mean() + pen()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(pen.previous[n], theta1[n])
        assert not torch.equal(p.detach(), theta1[n])
    assert pen().item() > 0.0


def test_continual_penalty_follows_the_model_dtype():
    model = Net()
    pen = cp.ContinualPenalty(model)
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.float()
    _perturb(model, seed=40)
    value = pen()
    assert value.dtype == torch.float32 and value.item() > 0.0
    assert all(pen.previous[n].dtype == torch.float32 for n in pen.names)
    assert all(torch.equal(pen.previous[n], theta1[n].float()) for n in pen.names)


def test_continual_penalty_selection():
    model = Net()
    pen = cp.ContinualPenalty(model, select=lambda n: n.startswith("lin."))
    assert pen.names == ("lin.weight", "lin.bias")
    pen = cp.ContinualPenalty(model, select=["dec.weight", "scale"])  # a tied parameter by its other name
    assert pen.names == ("scale", "emb.weight")
    _perturb(model, seed=5)
    w, s = model.emb.weight, model.scale
    bs = ref_block([w.detach() - pen.previous["emb.weight"], s.detach() - pen.previous["scale"]])
    ortho = ref_ortho([s.detach(), w.detach()], [pen.previous["scale"], pen.previous["emb.weight"]])
    assert pen().item() == pytest.approx(1e-3 * bs + 1e-3 * ortho, rel=1e-12)
    with pytest.raises(ValueError, match=r"^select: expected names of the model's parameters, got \['lin.w'\]"):
        cp.ContinualPenalty(model, select={"lin.w"})
    with pytest.raises(ValueError, match="^select: picked none"):
        cp.ContinualPenalty(model, select=lambda n: False)
    with pytest.raises(ValueError, match="^select: expected None, a function"):
        cp.ContinualPenalty(model, select="lin.weight")


def test_continual_penalty_errors():
    model = Net()
    for kw, arg in [(dict(lambda_bs=-1.0), "lambda_bs"), (dict(lambda_bs=float("nan")), "lambda_bs"),
                    (dict(lambda_bs=True), "lambda_bs"), (dict(lambda_o="1"), "lambda_o"),
                    (dict(lambda_o=float("inf")), "lambda_o")]:
        with pytest.raises(ValueError, match=f"^{arg}: expected a finite number >= 0"):
            cp.ContinualPenalty(model, **kw)
    with pytest.raises(ValueError, match="^model: expected a torch.nn.Module"):
        cp.ContinualPenalty([model.lin.weight])
    with pytest.raises(ValueError, match="^model: expected a torch.nn.Module"):
        cp.first_task_penalty("model")
    with pytest.raises(ValueError, match="^lambda_bs: "):
        cp.first_task_penalty(model, lambda_bs=-0.1)


def test_first_task_penalty_value_and_gradient():
    model = Net()
    theta = [dict(model.named_parameters())[n] for n in NAMES]
    value = cp.first_task_penalty(model)
    assert value.dim() == 0
    assert value.item() == pytest.approx(1e-7 * ref_block([t.detach() for t in theta]), rel=1e-12)
    value = cp.first_task_penalty(model, 0.25, select=lambda n: n != "scale")
    kept = [t for n, t in zip(NAMES, theta) if n != "scale"]
    assert value.item() == pytest.approx(0.25 * ref_block([t.detach() for t in kept]), rel=1e-12)
    grads = torch.autograd.grad(value, kept)
    for t, g in zip(kept, grads):
        assert torch.allclose(g, 0.25 * ref_block_grad(t.detach()), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------- cas_selection


MADE_UP = ["shared.w_xh", "cell._w_h.1", "cell._w_h.10", "cell._w_c.1", "cell._w_c.2", "cell._w_h.2",
           "cell._w_h.1.bias", "cell.x_w_h.1", "decoder.weight", "w_xh._w_h.3", "cell._w_h_bias"]
EDGES = ("_w_h.{}", "_w_c.{}")


def test_cas_selection_exact_indices():
    pick = cp.cas_selection(MADE_UP, [1], edge_patterns=EDGES, shared_patterns=("w_xh",))
    # edge 1's weights (not edge 10's: the code's substring test '_w_h.1' in name would take it), the shared
    # weights (also one that looks like an unused edge's), and every name matching no edge pattern
    assert pick == ["shared.w_xh", "cell._w_h.1", "cell._w_c.1", "cell._w_h.1.bias", "cell.x_w_h.1", "decoder.weight",
                    "w_xh._w_h.3", "cell._w_h_bias"]
    pick = cp.cas_selection(MADE_UP, [10, 2], edge_patterns=EDGES, shared_patterns=("w_xh",))
    assert pick == ["shared.w_xh", "cell._w_h.10", "cell._w_c.2", "cell._w_h.2", "cell.x_w_h.1", "decoder.weight",
                    "w_xh._w_h.3", "cell._w_h_bias"]
    no_shared = cp.cas_selection(MADE_UP, [], edge_patterns=EDGES, shared_patterns=())
    assert no_shared == ["shared.w_xh", "cell.x_w_h.1", "decoder.weight", "cell._w_h_bias"]
    assert cp.cas_selection(MADE_UP, range(11), edge_patterns=EDGES, shared_patterns=()) == MADE_UP
    assert cp.cas_selection(["a.w.1", "a.w.1.w.2"], [2], edge_patterns=("w.{}",), shared_patterns=()) == ["a.w.1.w.2"]


def test_cas_selection_darts_cell_is_every_parameter():
    """In pynas's DARTS RNN evaluation cell each node has one incoming edge, whose weight is the node's: a cell uses
    every node's weight, so the condition-2 set is every parameter."""
    genotype = Genotype(recurrent=[("tanh", 0), ("relu", 0), ("identity", 1)], concat=[1, 2, 3])
    for g in (genotype, PUBLISHED["DARTS_V2"]):
        model = RNNModel(10, 4, 4, 4, 0.0, 0.0, 0.0, 0.0, 0.0, g).to(D)
        names = [n for n, _ in model.named_parameters()]
        assert "rnns.0._W0" in names and f"rnns.0._Ws.{len(g.recurrent) - 1}" in names
        pick = cp.cas_selection(names, range(len(g.recurrent)))
        assert pick == names
        pen = cp.ContinualPenalty(model, select=pick)
        assert list(pen.names) == names
        assert cp.cas_selection(names, [0]) == [n for n in names if not n.startswith("rnns.0._Ws.") or n.endswith(".0")]


def test_cas_selection_errors():
    for kw, arg in [(dict(names="abc"), "names"), (dict(names=[1]), "names"), (dict(used_edges=[-1]), "used_edges"),
                    (dict(used_edges=[True]), "used_edges"), (dict(used_edges="1"), "used_edges"),
                    (dict(used_edges=[1.0]), "used_edges"), (dict(edge_patterns=("_Ws",)), "edge_patterns"),
                    (dict(edge_patterns="_Ws.{}"), "edge_patterns"), (dict(edge_patterns=("{}.{}",)), "edge_patterns"),
                    (dict(edge_patterns=("_Ws.{0}",)), "edge_patterns"), (dict(shared_patterns=("_W{}",)),
                                                                           "shared_patterns"),
                    (dict(shared_patterns=("",)), "shared_patterns")]:
        args = dict(names=["a._Ws.1"], used_edges=[1])
        args.update(kw)
        with pytest.raises(ValueError, match=f"^{arg}: expected"):
            cp.cas_selection(**args)
