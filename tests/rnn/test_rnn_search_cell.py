"""The DARTS RNN search cell against a plain-PyTorch cell written here from docs/darts.md ("RNN space")."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pynas
from pynas.rnn import CONCAT, PRIMITIVES, STEPS, DARTSCellSearch


class RefCell(nn.Module):
    """The reference code's search cell, written out: masks, one GEMM per node, the per-candidate loop."""

    def __init__(self, ninp, nhid, dropouth, dropoutx):
        super().__init__()
        self.nhid, self.dropouth, self.dropoutx = nhid, dropouth, dropoutx
        self._W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid))
        self._Ws = nn.ParameterList([nn.Parameter(torch.empty(nhid, 2 * nhid)) for _ in range(STEPS)])
        self.bn = nn.BatchNorm1d(nhid, affine=False)

    def forward(self, inputs, hidden, weights):
        T, B = inputs.shape[:2]
        if self.training:
            # the reference code's mask2d: floor(rand + keep) / keep, float32, CPU generator
            kx, kh = 1 - self.dropoutx, 1 - self.dropouth
            xm = (torch.floor(torch.rand(B, inputs.size(2)) + kx) / kx).to(inputs.dtype)
            hm = (torch.floor(torch.rand(B, self.nhid) + kh) / kh).to(inputs.dtype)
        h = hidden[0]
        probs = F.softmax(weights, dim=-1)
        acts = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda t: t}
        outs = []
        for t in range(T):
            x = inputs[t]
            xh = torch.cat([x * xm, h * hm], -1) if self.training else torch.cat([x, h], -1)
            c0, h0 = torch.split(xh.mm(self._W0), self.nhid, -1)
            s0 = self.bn(h + c0.sigmoid() * (h0.tanh() - h))
            states, offset = s0.unsqueeze(0), 0
            for i in range(STEPS):
                masked = states * hm.unsqueeze(0) if self.training else states
                c, hh = torch.split(masked.view(-1, self.nhid).mm(self._Ws[i]).view(i + 1, -1, 2 * self.nhid),
                                    self.nhid, -1)
                c = c.sigmoid()
                s = torch.zeros_like(s0)
                for k, name in enumerate(PRIMITIVES):
                    if name == "none":
                        continue
                    unweighted = states + c * (acts[name](hh) - states)
                    s = s + torch.sum(probs[offset:offset + i + 1, k].unsqueeze(-1).unsqueeze(-1) * unweighted, 0)
                states = torch.cat([states, self.bn(s).unsqueeze(0)], 0)
                offset += i + 1
            h = torch.mean(states[-CONCAT:], 0)
            outs.append(h)
        hs = torch.stack(outs)
        return hs, hs[-1].unsqueeze(0)


def _cpu_built():
    return pynas.backends()["cpu"] is None


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cell_matches_the_plain_cell(backend, training, dtype):
    if backend == "cpu" and not _cpu_built():
        pytest.skip("the C++ CPU backend is not built")
    torch.manual_seed(0)
    cell = DARTSCellSearch(6, 5, 0.25, 0.75).to(dtype)
    ref = RefCell(6, 5, 0.25, 0.75).to(dtype)
    ref.load_state_dict(cell.state_dict(), strict=True)
    cell.train(training)
    ref.train(training)
    weights = (1e-1 * torch.randn(36, 5, dtype=dtype)).requires_grad_(True)
    cell.weights = weights
    x = torch.randn(4, 3, 6, dtype=dtype, requires_grad=True)
    h0 = torch.randn(1, 3, 5, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for _ in range(2):  # two sequences: the running statistics carry over
        torch.manual_seed(1)
        with pynas.use_backend(backend):
            out, last = cell(x, h0)
        if training and backend == "cpu":
            assert type(out.grad_fn).__name__ == "_RnnCellFunctionBackward"  # the fused sequence ran
        torch.manual_seed(1)
        out_ref, last_ref = ref(x, h0, weights)
        torch.testing.assert_close(out, out_ref, **tol)
        torch.testing.assert_close(last, last_ref, **tol)
        g = torch.randn_like(out)
        ga = torch.autograd.grad(out, list(cell.parameters()) + [weights, x, h0], g)
        gb = torch.autograd.grad(out_ref, list(ref.parameters()) + [weights, x, h0], g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, **tol)
        for a, b in zip(cell.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.skipif(not _cpu_built(), reason="the C++ CPU backend is not built")
def test_fused_sequence_gradcheck():
    from pynas.ops.rnn_cell import _RnnCellFunction

    torch.manual_seed(3)
    T, B, I, H, steps = 3, 4, 3, 2, 8
    dt = torch.float64
    xs = torch.randn(T, B, I, dtype=dt, requires_grad=True)
    h0 = torch.randn(B, H, dtype=dt, requires_grad=True)
    xm = (torch.rand(B, I, dtype=dt) > 0.3).to(dt) / 0.7
    hm = (torch.rand(B, H, dtype=dt) > 0.2).to(dt) / 0.8
    probs = torch.softmax(torch.randn(36, 5, dtype=dt), -1).requires_grad_(True)
    W0 = (0.5 * torch.randn(I + H, 2 * H, dtype=dt)).requires_grad_(True)
    Ws = [(0.5 * torch.randn(H, 2 * H, dtype=dt)).requires_grad_(True) for _ in range(steps)]

    def f(xs, h0, probs, W0, *Ws):
        rm, rv = torch.zeros(H, dtype=dt), torch.ones(H, dtype=dt)
        return _RnnCellFunction.apply("cpu", steps, 0.1, 1e-5, xs, h0, xm, hm, probs, rm, rv, W0, *Ws)

    assert torch.autograd.gradcheck(f, (xs, h0, probs, W0, *Ws), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_state_dict_keys_are_the_reference_layout():
    keys = list(DARTSCellSearch(4, 3, 0.1, 0.1).state_dict())
    assert keys == ["_W0"] + [f"_Ws.{i}" for i in range(STEPS)] + ["bn.running_mean", "bn.running_var",
                                                                    "bn.num_batches_tracked"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="nhid: expected a positive int"):
        DARTSCellSearch(4, 0, 0.1, 0.1)
    with pytest.raises(ValueError, match="dropoutx: expected a probability"):
        DARTSCellSearch(4, 3, 0.1, 1.0)
    with pytest.raises(RuntimeError, match="weights: the cell has no arch tensor"):
        DARTSCellSearch(4, 3, 0.1, 0.1)(torch.randn(2, 1, 4), torch.zeros(1, 1, 3))
