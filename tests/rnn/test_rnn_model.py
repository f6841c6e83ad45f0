"""The DARTS RNN search model against a plain-PyTorch model written here from docs/darts.md ("RNN space") and the
reference code's interface (embedded dropout, locked dropouts, the search cell, tied decoder)."""
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pynas
import pynas.rnn
from pynas.rnn import CONCAT, PRIMITIVES, STEPS, Genotype, RNNModelSearch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only stall

NTOKEN, NINP, T, B = 23, 6, 4, 3


def _cpu_built():
    return pynas.backends()["cpu"] is None


BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_built(),
                                                                       reason="the C++ CPU backend is not built"))]


from test_rnn_search_cell import RefCell  # noqa: E402  (the plain cell written out from docs/darts.md)


class RefModel(nn.Module):
    """The reference code's RNNModelSearch, written out: same submodule names (state_dict keys)."""

    def __init__(self, ntoken, ninp, dropout, dropouth, dropoutx, dropouti, dropoute):
        super().__init__()
        self.ntoken, self.ninp = ntoken, ninp
        self.dropout, self.dropouti, self.dropoute = dropout, dropouti, dropoute
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnns = nn.ModuleList([RefCell(ninp, ninp, dropouth, dropoutx)])
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight

    def _locked(self, x, p):
        if not self.training or not p:
            return x
        m = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
        return m.expand_as(x) * x

    def forward(self, input, hidden, weights):
        w = self.encoder.weight
        if self.training and self.dropoute:
            mask = w.new_empty(w.size(0), 1).bernoulli_(1 - self.dropoute).expand_as(w) / (1 - self.dropoute)
            w = mask * w
        emb = self._locked(F.embedding(input, w), self.dropouti)
        raw, new_h = self.rnns[0](emb, hidden[0], weights)
        out = self._locked(raw, self.dropout)
        logit = self.decoder(out.view(-1, self.ninp))
        log_prob = F.log_softmax(logit, -1).view(-1, input.size(1), self.ntoken)
        return log_prob, [new_h], [raw], [out]


def _pair(dropouts=(0.3, 0.25, 0.4, 0.2, 0.1), dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP, *dropouts).to(dtype)
    with torch.no_grad():
        model.weights.normal_(0, 0.5)  # non-trivial softmax
        for p in model.rnns[0].parameters():
            p.mul_(10)  # larger weights than the 0.04 init, so every term matters
    ref = RefModel(NTOKEN, NINP, dropouts[0], dropouts[1], dropouts[2], dropouts[3], dropouts[4]).to(dtype)
    ref.load_state_dict(model.state_dict(), strict=True)
    assert ref.decoder.weight is ref.encoder.weight
    return model, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_model_matches_the_plain_model(backend, training):
    model, ref = _pair()
    model.train(training)
    ref.train(training)
    g = torch.Generator().manual_seed(5)
    inp = torch.randint(0, NTOKEN, (T, B), generator=g)
    target = torch.randint(0, NTOKEN, (T * B,), generator=g)
    hidden = [torch.randn(1, B, NINP, generator=g, dtype=torch.float64)]
    hidden_ref = [h.clone() for h in hidden]
    tol = dict(rtol=1e-9, atol=1e-11)
    params = list(model.parameters())
    ref_params = list(ref.parameters())
    assert len(params) == len(ref_params) == 1 + 1 + STEPS + 1  # encoder (tied), W0, Ws, decoder.bias
    for it in range(2):  # two batches: the hidden state and the running statistics carry over
        torch.manual_seed(100 + it)
        with pynas.use_backend(backend):
            log_prob, new_h, raw, outs = model(inp, hidden, return_h=True)
        if training and backend == "cpu":
            assert type(raw[0].grad_fn).__name__ == "_RnnCellFunctionBackward"
        torch.manual_seed(100 + it)
        log_prob_r, new_h_r, raw_r, outs_r = ref(inp, hidden_ref, model.weights)
        assert log_prob.shape == (T, B, NTOKEN)
        torch.testing.assert_close(log_prob, log_prob_r, **tol)
        assert isinstance(new_h, list) and len(new_h) == 1 and new_h[0].shape == (1, B, NINP)
        torch.testing.assert_close(new_h[0], new_h_r[0], **tol)
        assert isinstance(raw, list) and len(raw) == 1 and isinstance(outs, list) and len(outs) == 1
        torch.testing.assert_close(raw[0], raw_r[0], **tol)
        torch.testing.assert_close(outs[0], outs_r[0], **tol)
        if training:  # the output dropout really dropped something (not the identity)
            assert not torch.equal(raw[0], outs[0])

        # _loss: the nll of the flattened log-probs, and the next hidden
        torch.manual_seed(100 + it)
        loss_r = F.nll_loss(ref(inp, hidden_ref, model.weights)[0].view(-1, NTOKEN), target)
        # the reference's pass above moved its BN running stats again; undo by replaying on the model too
        torch.manual_seed(100 + it)
        with pynas.use_backend(backend):
            loss, hnext = model._loss(hidden, inp, target)
        torch.testing.assert_close(loss, loss_r, **tol)
        torch.testing.assert_close(hnext[0], new_h_r[0], **tol)
        expected_loss = F.nll_loss(log_prob.view(-1, NTOKEN), target)
        torch.testing.assert_close(loss, expected_loss, **tol)

        ga = torch.autograd.grad(loss, params + [model.weights])
        gb = torch.autograd.grad(loss_r, ref_params + [model.weights])
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, **tol)
        assert ga[-1].abs().sum() > 0  # the arch gradient is not trivially zero
        for (na, a), (nb, b) in zip(model.state_dict().items(), ref.state_dict().items()):
            assert na == nb
            if training:
                torch.testing.assert_close(a, b, **tol)
            else:
                assert torch.equal(a, b)
        hidden = [h.detach() for h in new_h]
        hidden_ref = [h.detach() for h in new_h_r]
    if training:
        assert model.rnns[0].bn.num_batches_tracked.item() == 2 * 2 * 9 * T
    else:
        assert model.rnns[0].bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_batches_tracked_is_nine_per_step(backend):
    model, _ = _pair()
    inp = torch.randint(0, NTOKEN, (T, B))
    with pynas.use_backend(backend):
        model(inp, model.init_hidden(B))
    assert model.rnns[0].bn.num_batches_tracked.item() == 9 * T


# -- interface ----------------------------------------------------------------------------------------------
def test_state_dict_layout_and_tied_decoder():
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP)
    keys = list(model.state_dict())
    assert keys == (["encoder.weight", "rnns.0._W0"] + [f"rnns.0._Ws.{i}" for i in range(STEPS)]
                    + ["rnns.0.bn.running_mean", "rnns.0.bn.running_var", "rnns.0.bn.num_batches_tracked",
                       "decoder.weight", "decoder.bias"])
    assert model.decoder.weight is model.encoder.weight
    assert model.encoder.weight.shape == (NTOKEN, NINP)
    assert torch.all(model.decoder.bias == 0)
    assert model.encoder.weight.abs().max() <= 0.04 and model.rnns[0]._W0.abs().max() <= 0.04


def test_arch_tensor():
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP)
    w = model.weights
    assert w.shape == (36, 5) and w.requires_grad and w.is_leaf
    assert all(p is not w for p in model.parameters())
    assert all(t is not w for t in model.state_dict().values())
    assert not any(k.endswith("weights") for k in model.state_dict())
    assert model.arch_parameters() == [w] and model.arch_parameters()[0] is w
    assert model.rnns[0].weights is w


def test_init_hidden():
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP).double()
    h = model.init_hidden(5)
    assert isinstance(h, list) and len(h) == 1
    assert h[0].shape == (1, 5, NINP) and h[0].dtype == torch.float64 and torch.all(h[0] == 0)


def test_double_carries_the_arch_tensor():
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP)
    w = model.weights
    before = w.detach().clone()
    model.double()
    assert model.weights is w and model.rnns[0].weights is w and model.arch_parameters()[0] is w
    assert w.dtype == torch.float64 and w.requires_grad
    torch.testing.assert_close(w.detach(), before.double())
    model.eval()
    log_prob, _ = model(torch.randint(0, NTOKEN, (T, B)), model.init_hidden(B))
    assert log_prob.dtype == torch.float64
    log_prob.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float64


@pytest.mark.parametrize("method", ["new", "clone"])
def test_new_copies_alphas_and_configuration(method):
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP, 0.3, 0.2, 0.1, 0.15, 0.05).double()
    with torch.no_grad():
        model.weights.normal_()
    other = getattr(model, method)()
    assert type(other) is RNNModelSearch
    assert torch.equal(other.weights, model.weights) and other.weights is not model.weights
    assert other.weights.requires_grad and other.rnns[0].weights is other.weights
    assert other.arch_parameters() == [other.weights]
    assert other.weights.dtype == torch.float64 and next(other.parameters()).dtype == torch.float64
    assert (other.ntoken, other.ninp, other.nhid, other.nhidlast) == (NTOKEN, NINP, NINP, NINP)
    assert (other.dropout, other.dropouti, other.dropoute) == (0.3, 0.15, 0.05)
    assert (other.rnns[0].dropouth, other.rnns[0].dropoutx) == (0.2, 0.1)
    assert other.decoder.weight is other.encoder.weight
    with torch.no_grad():
        other.weights.add_(1)
    assert not torch.equal(other.weights, model.weights)  # a copy, not a view


def _arch_for(genes, dtype=torch.float32):
    """An arch tensor whose softmax picks gene (op, j) for node i: 2.0 on that entry, 0 elsewhere."""
    a = torch.zeros(36, 5, dtype=dtype)
    start = 0
    for i, (op, j) in enumerate(genes):
        if op is not None:
            a[start + j, PRIMITIVES.index(op)] = 2.0
        start += i + 1
    return a


def test_genotype_rule():
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP)
    genes = [("tanh", 0), ("relu", 1), ("sigmoid", 0), ("identity", 3), ("tanh", 2), ("relu", 5),
             ("identity", 6), ("sigmoid", 7)]
    a = _arch_for(genes)
    # 'none' is ignored: a huge 'none' weight on another edge of node 3 does not win it
    a[6 + 1, 0] = 10.0
    # node 4 (edges 10..14): a second, smaller candidate on another edge loses
    a[10 + 4, PRIMITIVES.index("relu")] = 1.5
    with torch.no_grad():
        model.weights.copy_(a)
    g = model.genotype()
    assert isinstance(g, Genotype)
    assert g.recurrent == genes
    assert g.concat == [1, 2, 3, 4, 5, 6, 7, 8] == list(range(1, STEPS + 1))[-CONCAT:]


def test_genotype_ties_keep_the_earlier_index():
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP)
    a = torch.zeros(36, 5)
    # node 1 (rows 1, 2): both edges identical, tanh and relu tied on each -> edge 0, tanh
    a[1, 1] = a[1, 2] = a[2, 1] = a[2, 2] = 1.0
    # node 2 (rows 3..5): edges 1 and 2 tied on sigmoid/identity -> edge 1, sigmoid
    a[4, 3] = a[4, 4] = a[5, 3] = a[5, 4] = 1.0
    # nodes 3.. all zero: every edge and every op tied -> edge 0, tanh
    with torch.no_grad():
        model.weights.copy_(a)
    g = model.genotype()
    assert g.recurrent[0] == ("tanh", 0)
    assert g.recurrent[1] == ("tanh", 0)
    assert g.recurrent[2] == ("sigmoid", 1)
    assert g.recurrent[3:] == [("tanh", 0)] * 5


def test_json_round_trip_and_errors():
    genes = [("tanh", 0), ("relu", 1), ("sigmoid", 0), ("identity", 3), ("tanh", 2), ("relu", 5),
             ("identity", 6), ("sigmoid", 7)]
    g = Genotype(recurrent=genes, concat=list(range(1, 9)))
    text = pynas.rnn.to_json(g)
    assert json.loads(text) == {"recurrent": [[op, j] for op, j in genes], "concat": list(range(1, 9))}
    back = pynas.rnn.from_json(text)
    assert back == g and isinstance(back, Genotype)
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP)
    assert pynas.rnn.from_json(pynas.rnn.to_json(model.genotype())) == model.genotype()
    for bad in ["not json", "[1, 2]", '{"recurrent": []}', '{"recurrent": [["none", 0]], "concat": [1]}',
                '{"recurrent": [["conv", 0]], "concat": [1]}', '{"recurrent": [["tanh"]], "concat": [1]}']:
        with pytest.raises(ValueError):
            pynas.rnn.from_json(bad)


@pytest.mark.parametrize("bad", ['{"recurrent": null, "concat": [1]}', '{"recurrent": 5, "concat": [1]}',
                                 '{"recurrent": [["tanh", null]], "concat": [1]}',
                                 '{"recurrent": [["tanh", 0]], "concat": null}',
                                 '{"recurrent": [["tanh", 0]], "concat": [[1]]}'])
def test_from_json_wrong_types_raise_value_error(bad):
    with pytest.raises(ValueError):
        pynas.rnn.from_json(bad)


@pytest.mark.parametrize("bad", ['{"recurrent": [["tanh", 1.7]], "concat": [1]}',
                                 '{"recurrent": [["tanh", true]], "concat": [1]}',
                                 '{"recurrent": [["tanh", 99]], "concat": [1]}',
                                 '{"recurrent": [["tanh", 0], ["relu", 0.0]], "concat": [1]}'])
def test_from_json_rejects_bad_input_indices(bad):
    with pytest.raises(ValueError):
        pynas.rnn.from_json(bad)


def test_constructor_errors():
    with pytest.raises(ValueError, match="ninp"):
        RNNModelSearch(NTOKEN, 4, 5, 5)
    with pytest.raises(ValueError, match="nhidlast"):
        RNNModelSearch(NTOKEN, 4, 4, 5)
    with pytest.raises(ValueError, match="dropout: "):
        RNNModelSearch(NTOKEN, 4, 4, 4, dropout=1.0)
    with pytest.raises(ValueError, match="dropout: "):
        RNNModelSearch(NTOKEN, 4, 4, 4, dropout=-0.1)
    with pytest.raises(ValueError, match="dropouti: "):
        RNNModelSearch(NTOKEN, 4, 4, 4, dropouti=1.5)
    with pytest.raises(ValueError, match="dropoute: "):
        RNNModelSearch(NTOKEN, 4, 4, 4, dropoute=1.0)
    with pytest.raises(ValueError, match="dropouth: "):
        RNNModelSearch(NTOKEN, 4, 4, 4, dropouth=1.0)
    with pytest.raises(ValueError, match="dropoutx: "):
        RNNModelSearch(NTOKEN, 4, 4, 4, dropoutx=1.0)
    with pytest.raises(ValueError, match="ntoken"):
        RNNModelSearch(0, 4, 4, 4)


# -- compat -------------------------------------------------------------------------------------------------
def test_compat_module_exports():
    from pynas.compat.darts import rnn as compat

    for name in ["PRIMITIVES", "STEPS", "CONCAT", "Genotype", "DARTSCellSearch", "RNNModelSearch", "Architect"]:
        assert hasattr(compat, name), name
    assert compat.PRIMITIVES == ["none", "tanh", "relu", "sigmoid", "identity"]
    assert compat.STEPS == 8 and compat.CONCAT == 8
    assert compat.RNNModelSearch is RNNModelSearch and compat.Genotype is Genotype


def test_compat_architect_reads_args():
    from pynas.compat.darts import rnn as compat

    model = compat.RNNModelSearch(NTOKEN, NINP, NINP, NINP, 0.1, 0.1, 0.1, 0.1, 0.0)
    args = types.SimpleNamespace(wdecay=1e-4, clip=0.5, arch_lr=7e-3, arch_wdecay=2e-3)
    arch = compat.Architect(model, args)
    assert arch.network_weight_decay == 1e-4 and arch.network_clip == 0.5
    group = arch.optimizer.param_groups[0]
    assert isinstance(arch.optimizer, torch.optim.Adam)
    assert group["lr"] == 7e-3 and group["weight_decay"] == 2e-3 and tuple(group["betas"]) == (0.9, 0.999)
    assert group["params"][0] is model.weights
    for missing in ["wdecay", "clip", "arch_lr", "arch_wdecay"]:
        kw = dict(wdecay=1e-4, clip=0.5, arch_lr=7e-3, arch_wdecay=2e-3)
        del kw[missing]
        with pytest.raises(ValueError, match=missing):
            compat.Architect(model, types.SimpleNamespace(**kw))
