"""ESS (pynas/strategies/ess.py) against plain-PyTorch cells written here from its semantics: the search cell
(inter-cell DAGs f and g feeding the DARTS cell) forward and backward on every backend, the hidden window carried
across batches, the derivation rule on hand-made betas, the genotype JSON, the evaluation cell, the DARTS
architect's second-order step over [alpha, beta_f, beta_g], a tiny search (first and second order, reproducible,
exact resume) and ``pynas train rnn`` on its genotype."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pynas import _backend
from pynas.cli import main
from pynas.rnn import CONCAT, PRIMITIVES, STEPS
from pynas.rnn.data import stdlib_min_tokens
from pynas.rnn.genotypes import DARTS_V2, Genotype, from_json, load_genotype, to_json
from pynas.search.rnn import RNNSearch, RNNSearchConfig, run_rnn_search
from pynas.strategies import ess
from pynas.strategies.darts import RNNArchitect
from pynas.strategies.ess import (ESSCell, ESSCellSearch, ESSGenotype, ESSModel, ESSRNNModel, InterGenotype,
                                  dag_edges, parse_dag)
from pynas.train.rnn import RNNTrainConfig, run_training

BACKENDS = [b for b in ("reference", "cpu") if _backend.backends().get(b) is None]
ACTS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda t: t}
DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only stall


def quiet(s):
    pass


# -- a plain ESS cell, written from the semantics -----------------------------------------------------------------


def _masks(B, H, dropoutx, dropouth, dtype):
    """The masks the cell draws (x then h, ``floor(rand + keep) / keep`` from the CPU generator)."""
    kx, kh = 1 - dropoutx, 1 - dropouth
    xm = (torch.floor(torch.rand(B, H) + kx) / kx).to(dtype)
    hm = (torch.floor(torch.rand(B, H) + kh) / kh).to(dtype)
    return xm, hm


def _mixed_node(states, W, probs, masks, nhid):
    """sum_j sum_{o != none} p[j, o] (s_j + sigmoid(c_j) (o(h_j) - s_j)), [c_j | h_j] = (s_j * mask_j) W."""
    s = 0
    for j, prev in enumerate(states):
        masked = prev * masks[j] if masks is not None else prev
        c, hh = torch.split(masked.mm(W), nhid, -1)
        c = torch.sigmoid(c)
        for o, name in enumerate(PRIMITIVES):
            if name != "none":
                s = s + probs[j, o] * (prev + c * (ACTS[name](hh) - prev))
    return s


def _ref_dag(sources, Ws, probs, masks, bn, m, nhid):
    states, offset = list(sources), 0
    for W in Ws:
        n = len(states)
        states.append(bn(_mixed_node(states, W, probs[offset:offset + n], masks, nhid)))
        offset += n
    return sum(states[m + 1:]) / len(Ws)


def _ref_search_sequence(cell, inputs, window, alpha, beta_f, beta_g, training, masks, running):
    """The ESS search cell over a sequence: ``running`` = {name: [mean, var]} of the three BatchNorms."""
    m, K, H = cell.m, cell.nodes, cell.nhid

    def bn(name):
        return lambda t: F.batch_norm(t, running[name][0], running[name][1], None, None, training, 0.1, 1e-5)

    xm, hm = masks if training else (None, None)
    mf = [hm] + [xm] * m + [hm] * K if training else None
    mg = [xm] + [hm] * (m + K) if training else None
    pa, pf, pg = (torch.softmax(a, -1) for a in (alpha, beta_f, beta_g))
    hs = [window[i] for i in range(m)]
    xs = [window[m + i] for i in range(m)]
    outs = []
    for t in range(inputs.shape[0]):
        x = inputs[t]
        h_hat = _ref_dag([hs[0]] + xs, list(cell.f._Ws), pf, mf, bn("f"), m, H)
        x_hat = _ref_dag([x] + hs, list(cell.g._Ws), pg, mg, bn("g"), m, H)
        xh = torch.cat([x_hat * xm, h_hat * hm], -1) if training else torch.cat([x_hat, h_hat], -1)
        c0, h0 = torch.split(xh.mm(cell._W0), H, -1)
        states = [bn("pi")(h_hat + torch.sigmoid(c0) * (torch.tanh(h0) - h_hat))]
        offset = 0
        for i in range(STEPS):
            node_masks = [hm] * len(states) if training else None
            states.append(bn("pi")(_mixed_node(states, cell._Ws[i], pa[offset:offset + i + 1], node_masks, H)))
            offset += i + 1
        h = sum(states[-CONCAT:]) / CONCAT
        outs.append(h)
        hs, xs = [h] + hs[:-1], [x] + xs[:-1]
    return torch.stack(outs), torch.stack(hs + xs)


def _running(cell):
    return {name: [bn.running_mean.clone(), bn.running_var.clone()]
            for name, bn in (("pi", cell.bn), ("f", cell.f.bn), ("g", cell.g.bn))}


def _search_cell(m=2, nodes=3, H=5, dropouth=0.3, dropoutx=0.4, seed=0):
    torch.manual_seed(seed)
    cell = ESSCellSearch(H, H, dropouth, dropoutx, m, nodes).to(DT)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0, 0.5)  # away from the tiny init, so every term matters
        for bn in (cell.bn, cell.f.bn, cell.g.bn):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    edges = dag_edges(m, nodes)
    alpha = torch.randn(36, 5, dtype=DT, requires_grad=True)
    beta_f = torch.randn(edges, 5, dtype=DT, requires_grad=True)
    beta_g = torch.randn(edges, 5, dtype=DT, requires_grad=True)
    cell.weights, cell.beta_f, cell.beta_g = alpha, beta_f, beta_g
    return cell, (alpha, beta_f, beta_g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_search_cell_matches_the_plain_cell(backend, training):
    cell, arch = _search_cell()
    cell.train(training)
    T, B, H, m = 4, 3, 5, cell.m
    x = torch.randn(T, B, H, dtype=DT, requires_grad=True)
    window = torch.randn(2 * m, B, H, dtype=DT, requires_grad=True)
    running = _running(cell)
    torch.manual_seed(7)
    with _backend.use_backend(backend):
        out, state = cell(x, window)
    torch.manual_seed(7)
    masks = _masks(B, H, cell.dropoutx, cell.dropouth, DT)
    if training:
        assert ((masks[0] == 0).any() and (masks[1] == 0).any())  # the masks drop something
    want, want_state = _ref_search_sequence(cell, x, window, *arch, training, masks, running)
    assert out.shape == (T, B, H) and state.shape == (2 * m, B, H)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-12)
    wrt = list(cell.parameters()) + list(arch) + [x, window]
    assert len(list(cell.parameters())) == 1 + STEPS + 2 * cell.nodes
    g_out, g_state = torch.randn_like(out), torch.randn_like(state)
    got = torch.autograd.grad((out * g_out).sum() + (state * g_state).sum(), wrt)
    ref = torch.autograd.grad((want * g_out).sum() + (want_state * g_state).sum(), wrt)
    for a, b in zip(got, ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for name, bn in (("pi", cell.bn), ("f", cell.f.bn), ("g", cell.g.bn)):  # running statistics, train mode
        torch.testing.assert_close(bn.running_mean, running[name][0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(bn.running_var, running[name][1], rtol=1e-12, atol=1e-13)


def _model(dropouts=(0.0, 0.0, 0.0, 0.0, 0.0), m=3, nodes=3, seed=0, ntoken=20, H=6):
    torch.manual_seed(seed)
    model = ESSRNNModel(ntoken, H, H, H, *dropouts, m=m, nodes=nodes).double()
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
        for p in model.parameters():
            p.mul_(10)
    return model


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU backend is not built")
def test_cpu_backend_equals_the_reference_backend():
    model = _model(dropouts=(0.3, 0.2, 0.3, 0.1, 0.1))
    model.train()
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 20, (5, 3), generator=g)
    target = torch.randint(0, 20, (15,), generator=g)
    hidden = [torch.randn(6, 3, 6, generator=g, dtype=DT)]
    wrt = model.arch_parameters() + list(model.parameters())
    results = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(3)
        with _backend.use_backend(backend):
            loss, nxt = model._loss(hidden, data, target)
            results[backend] = (loss.detach(), nxt[0].detach(), torch.autograd.grad(loss, wrt))
    (la, ha, ga), (lb, hb, gb) = results["reference"], results["cpu"]
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
    torch.testing.assert_close(ha, hb, rtol=1e-12, atol=1e-13)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_beta_edge_receives_a_gradient(backend):
    torch.manual_seed(0)
    model = ESSRNNModel(20, 8, 8, 8, 0.2, 0.2, 0.2, 0.1, 0.0).double()  # the real init
    alpha, beta_f, beta_g = model.arch_parameters()
    assert model.arch_parameters() == [model.weights, model.beta_f, model.beta_g]
    assert beta_f.shape == beta_g.shape == (dag_edges(3, 3), 5) == (15, 5) and alpha.shape == (36, 5)
    assert beta_f.abs().max() < 1e-2 and not torch.equal(beta_f, beta_g)  # 1e-3 * randn, each its own
    g = torch.Generator().manual_seed(2)
    data = torch.randint(0, 20, (4, 3), generator=g)
    target = torch.randint(0, 20, (12,), generator=g)
    model.train()
    with _backend.use_backend(backend):
        loss, _ = model._loss(model.init_hidden(3), data, target)
        grads = torch.autograd.grad(loss, model.arch_parameters())
    for grad in grads:
        assert (grad.abs().sum(-1) > 0).all()  # every edge of every DAG


@pytest.mark.parametrize("training", [True, False])
def test_the_window_carried_across_two_batches_is_one_run(training):
    model = _model(m=2, nodes=2)
    model.train(training)
    g = torch.Generator().manual_seed(4)
    data = torch.randint(0, 20, (7, 3), generator=g)
    hidden = model.init_hidden(3)
    assert isinstance(hidden, list) and len(hidden) == 1 and hidden[0].shape == (4, 3, 6)
    assert not hidden[0].any()  # zeros before the start of the text
    whole, h_whole = model(data, hidden)
    first, h1 = model(data[:3], hidden)
    h1 = [h.detach() for h in h1]  # as the search loop carries it
    second, h2 = model(data[3:], h1)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h2[0], h_whole[0], rtol=1e-12, atol=1e-13)
    # the window: the last m cell outputs and the last m cell inputs, newest first
    cell = model.rnns[0]
    emb = model.encoder(data)
    outs, state = cell(emb, hidden[0])
    torch.testing.assert_close(state, torch.stack([outs[-1], outs[-2], emb[-1], emb[-2]]), rtol=0, atol=0)


def test_the_zero_window_is_the_start_of_the_text():
    cell, arch = _search_cell(m=3, nodes=2)
    cell.eval()
    x = torch.randn(4, 2, 5, dtype=DT)
    out, _ = cell(x, torch.zeros(6, 2, 5, dtype=DT))
    # the plain cell over the zero window; and every slot of the window is read (a nonzero one moves the output)
    want, _ = _ref_search_sequence(cell, x, torch.zeros(6, 2, 5, dtype=DT), *arch, False, None, _running(cell))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    for i in range(6):
        w = torch.zeros(6, 2, 5, dtype=DT)
        w[i] = torch.randn(2, 5, dtype=DT)
        assert (cell(x, w)[0][0] - out[0]).abs().max() > 1e-6, i


# -- the genotype -----------------------------------------------------------------------------------------------


def test_derivation_on_hand_made_betas():
    m, nodes = 2, 3
    relu, tanh, sig, ident, none = (PRIMITIVES.index(n) for n in ("relu", "tanh", "sigmoid", "identity", "none"))
    w = torch.zeros(dag_edges(m, nodes), 5, dtype=DT)
    # node 0 (rows 0..2): input 1 has the best non-'none' candidate; input 0 a large 'none' (never counted)
    w[0, none] = 9.0
    w[0, relu] = 1.0
    w[1, tanh] = 3.0
    # node 1 (rows 3..6): node 0 (state 3) wins with sigmoid
    w[3 + 3, sig] = 2.0
    w[3 + 0, ident] = 1.5
    # node 2 (rows 7..11): a tie between inputs 0 and 4 keeps the earlier; on it relu over identity (tie: earlier)
    w[7 + 0, relu] = w[7 + 0, ident] = w[7 + 4, tanh] = w[7 + 4, sig] = 4.0
    genes = parse_dag(torch.softmax(w, -1), m, nodes)
    assert genes == [("tanh", 1), ("sigmoid", 3), ("relu", 0)]
    model = ESSRNNModel(20, 4, 4, 4, m=m, nodes=nodes)
    with torch.no_grad():
        model.beta_f.copy_(w)
        model.beta_g.copy_(w.flip(0))
    got = model.genotype()
    assert isinstance(got, ESSGenotype)
    assert got.inter == InterGenotype(m=m, f=genes, g=parse_dag(torch.softmax(w.flip(0), -1), m, nodes))
    intra = Genotype(got.recurrent, got.concat)
    from pynas.rnn.genotypes import derive
    assert intra == derive(model.weights)
    with pytest.raises(ValueError, match=r"probs: expected shape \(12, 5\)"):
        parse_dag(torch.zeros(11, 5), m, nodes)


GENO = ESSGenotype(recurrent=list(DARTS_V2.recurrent), concat=list(DARTS_V2.concat),
                   inter=InterGenotype(m=2, f=[("relu", 1), ("tanh", 3), ("identity", 0)],
                                       g=[("sigmoid", 2), ("relu", 0)]))


def test_genotype_json_round_trip(tmp_path):
    text = to_json(GENO)
    data = json.loads(text)
    assert data["inter"] == {"m": 2, "f": [["relu", 1], ["tanh", 3], ["identity", 0]],
                             "g": [["sigmoid", 2], ["relu", 0]]}
    assert from_json(text) == GENO and ess.from_json(text) == GENO and ess.to_json(GENO) == text
    assert from_json(data) == GENO
    # a plain DARTS genotype stays one, and its JSON has no 'inter'
    assert type(from_json(to_json(DARTS_V2))) is Genotype and "inter" not in to_json(DARTS_V2)
    with pytest.raises(ValueError, match="text: expected an ESS genotype"):
        ess.from_json(to_json(DARTS_V2))
    path = tmp_path / "g.json"
    path.write_text(text + "\n")
    assert load_genotype(str(path)) == GENO


def _bad(inter):
    data = json.loads(to_json(GENO))
    data["inter"] = inter
    return json.dumps(data)


@pytest.mark.parametrize("inter, match", [
    ([1, 2], "text: inter must be an object with keys m, f, g"),
    ({"m": 2, "f": [["relu", 0]]}, "text: inter must be an object with keys m, f, g"),
    ({"m": 0, "f": [["relu", 0]], "g": [["relu", 0]]}, "text: inter.m must be a positive int"),
    ({"m": True, "f": [["relu", 0]], "g": [["relu", 0]]}, "text: inter.m must be a positive int"),
    ({"m": 2, "f": [], "g": [["relu", 0]]}, "text: inter.f must be a non-empty list"),
    ({"m": 2, "f": [["relu", 0]], "g": "relu"}, "text: inter.g must be a non-empty list"),
    ({"m": 2, "f": [["relu"]], "g": [["relu", 0]]}, "text: inter.f entries must be"),
    ({"m": 2, "f": [["relu", 0]], "g": [["none", 0]]}, "text: inter.g: unknown op 'none'"),
    ({"m": 2, "f": [["gelu", 0]], "g": [["relu", 0]]}, "text: inter.f: unknown op 'gelu'"),
    ({"m": 2, "f": [["relu", 3]], "g": [["relu", 0]]}, r"text: inter.f: node 0 can take a state 0..2"),
    ({"m": 2, "f": [["relu", 0], ["relu", 4]], "g": [["relu", 0]]}, r"text: inter.f: node 1 can take a state 0..3"),
    ({"m": 2, "f": [["relu", 0]], "g": [["relu", -1]]}, r"text: inter.g: node 0 can take a state 0..2"),
])
def test_bad_genotype_json_names_the_field(inter, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        from_json(_bad(inter))
    path = tmp_path / "bad.json"
    path.write_text(_bad(inter))
    with pytest.raises(ValueError, match="genotype: .*bad.json: " + match):
        load_genotype(str(path))


# -- the evaluation cell ----------------------------------------------------------------------------------------


def _ref_dag_derived(sources, Ws, genes, masks, m, nhid):
    states = list(sources)
    for W, (op, j) in zip(Ws, genes):
        s = states[j]
        c, hh = torch.split((s * masks[j] if masks is not None else s).mm(W), nhid, -1)
        states.append(s + torch.sigmoid(c) * (ACTS[op](hh) - s))
    return sum(states[m + 1:]) / len(genes)


def _ref_eval_sequence(cell, genotype, inputs, window, training, masks):
    m, H = genotype.inter.m, cell.nhid
    xm, hm = masks if training else (None, None)
    mf = [hm] + [xm] * m + [hm] * len(genotype.inter.f) if training else None
    mg = [xm] + [hm] * (m + len(genotype.inter.g)) if training else None
    hs, xs = [window[i] for i in range(m)], [window[m + i] for i in range(m)]
    outs = []
    for t in range(inputs.shape[0]):
        x = inputs[t]
        h_hat = _ref_dag_derived([hs[0]] + xs, list(cell.f._Ws), genotype.inter.f, mf, m, H)
        x_hat = _ref_dag_derived([x] + hs, list(cell.g._Ws), genotype.inter.g, mg, m, H)
        xh = torch.cat([x_hat * xm, h_hat * hm], -1) if training else torch.cat([x_hat, h_hat], -1)
        c0, h0 = torch.split(xh.mm(cell._W0), H, -1)
        states = [h_hat + torch.sigmoid(c0) * (torch.tanh(h0) - h_hat)]
        for W, (op, j) in zip(cell._Ws, genotype.recurrent):
            s = states[j]
            c, hh = torch.split((s * hm if training else s).mm(W), H, -1)
            states.append(s + torch.sigmoid(c) * (ACTS[op](hh) - s))
        h = sum(states[i] for i in genotype.concat) / len(genotype.concat)
        outs.append(h)
        hs, xs = [h] + hs[:-1], [x] + xs[:-1]
    return torch.stack(outs), torch.stack(hs + xs)


@pytest.mark.parametrize("training", [True, False])
def test_evaluation_cell_matches_the_plain_cell(training):
    torch.manual_seed(0)
    H, B, T = 5, 3, 4
    cell = ESSCell(H, H, 0.3, 0.4, GENO).to(DT)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0, 0.5)
    cell.train(training)
    x = torch.randn(T, B, H, dtype=DT, requires_grad=True)
    window = torch.randn(4, B, H, dtype=DT, requires_grad=True)
    torch.manual_seed(5)
    out, state = cell(x, window)
    torch.manual_seed(5)
    want, want_state = _ref_eval_sequence(cell, GENO, x, window, training, _masks(B, H, 0.4, 0.3, DT))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(state, want_state, rtol=1e-12, atol=1e-13)
    wrt = list(cell.parameters()) + [x, window]
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * go).sum(), wrt), torch.autograd.grad((want * go).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_evaluation_weights_are_laid_out_like_the_search_model():
    search = ESSRNNModel(20, 6, 6, 6, m=2, nodes=3)
    genotype = ESSGenotype(recurrent=list(DARTS_V2.recurrent), concat=list(DARTS_V2.concat),
                           inter=InterGenotype(m=2, f=[("relu", 0), ("tanh", 3), ("relu", 4)],
                                               g=[("sigmoid", 1), ("relu", 0), ("identity", 2)]))
    model = ESSModel(20, 6, 6, 6, 0.1, 0.1, 0.1, 0.1, 0.1, genotype)
    weights = {k: v for k, v in search.state_dict().items() if "bn." not in k}
    assert set(weights) == set(model.state_dict())
    model.load_state_dict(weights, strict=True)  # the same names and shapes
    assert model.init_hidden(3)[0].shape == (4, 3, 6)
    with pytest.raises(TypeError, match="genotype: expected an ESSGenotype"):
        ESSModel(20, 6, 6, 6, 0.1, 0.1, 0.1, 0.1, 0.1, DARTS_V2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="m: expected a positive int"):
        ESSCellSearch(4, 4, 0.1, 0.1, m=0)
    with pytest.raises(ValueError, match="nodes: expected a positive int"):
        ESSRNNModel(20, 4, 4, 4, nodes=0)
    with pytest.raises(ValueError, match="ninp, nhid: expected equal sizes"):
        ESSCellSearch(4, 5, 0.1, 0.1)
    model = ESSRNNModel(20, 4, 4, 4)
    with pytest.raises(ValueError, match=r"hidden: expected the window \(2m, B, H\) = \(6, 2, 4\)"):
        model(torch.zeros(3, 2, dtype=torch.long), [torch.zeros(1, 2, 4)])
    with pytest.raises(RuntimeError, match="weights: the cell has no arch tensors"):
        ESSCellSearch(4, 4, 0.1, 0.1)(torch.zeros(2, 1, 4), torch.zeros(6, 1, 4))
    with pytest.raises(ValueError, match="ess_m: expected a positive integer"):
        RNNSearch(RNNSearchConfig(method="ess", ess_m=0))
    with pytest.raises(ValueError, match="ess_nodes: expected a positive integer"):
        RNNSearch(RNNSearchConfig(method="ess", ess_nodes=1.5))


# -- the architecture step --------------------------------------------------------------------------------------


def test_second_order_step_is_the_exact_hypergradient_over_all_three_arch_tensors():
    """The DARTS RNN architect, unchanged, over [alpha, beta_f, beta_g]: its finite-difference step against the
    double-backward hypergradient (tests/strategies/test_darts_rnn.py has the rule)."""
    model = _model(m=2, nodes=2, H=5)
    model.train()
    g = torch.Generator().manual_seed(1)
    d = dict(hidden_train=[torch.randn(4, 3, 5, generator=g, dtype=DT)],
             input_train=torch.randint(0, 20, (3, 3), generator=g),
             target_train=torch.randint(0, 20, (9,), generator=g),
             hidden_valid=[torch.randn(4, 3, 5, generator=g, dtype=DT)],
             input_valid=torch.randint(0, 20, (3, 3), generator=g),
             target_valid=torch.randint(0, 20, (9,), generator=g))
    eta, clip, wd = 2.0, 1e-3, 5e-4
    exact = copy.deepcopy(model)
    params, arch = list(exact.parameters()), exact.arch_parameters()
    with _backend.use_backend("reference"):
        gr = torch.autograd.grad(exact._loss(d["hidden_train"], d["input_train"], d["target_train"])[0], params)
        coef = torch.clamp(clip / (torch.sqrt(sum((x ** 2).sum() for x in gr)) + 1e-6), max=1.0)
        w0 = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, gr):
                p.sub_(eta * (coef * gi + wd * p))
        grads = torch.autograd.grad(exact._loss(d["hidden_valid"], d["input_valid"], d["target_valid"])[0],
                                    arch + params)
        dalpha, v = grads[:3], grads[3:]
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
        gt = torch.autograd.grad(exact._loss(d["hidden_train"], d["input_train"], d["target_train"])[0], params,
                                 create_graph=True)
        hvp = torch.autograd.grad(sum((a * b).sum() for a, b in zip(gt, v)), arch)
    want = [da - eta * coef * h for da, h in zip(dalpha, hvp)]
    assert all((eta * coef * h).abs().max() > 1e-4 * da.abs().max() for da, h in zip(dalpha, hvp))
    architect = RNNArchitect(model, weight_decay=wd, clip=clip, fd_r=1e-5)
    with _backend.use_backend("reference"):
        got, hidden = architect.unrolled_grad(*d.values(), eta)
    assert len(got) == 3 and hidden[0].shape == (4, 3, 5) and not hidden[0].requires_grad
    for a, b in zip(got, want):  # measured: ~1e-13 .. 2e-12; a missing correction is off by > 1e-4
        assert (a - b).abs().max() <= 1e-9 * b.abs().max()


# -- the search, and training its genotype ----------------------------------------------------------------------


TINY = dict(method="ess", emsize=16, nhid=16, nhidlast=16, batch_size=4, bptt=5, epochs=2, steps_per_epoch=2,
            eval_batch_size=4, max_tokens=stdlib_min_tokens(32, 8))


@pytest.mark.parametrize("unrolled", [False, True])
def test_tiny_ess_search_is_reproducible_and_resumes_exactly(tmp_path, unrolled):
    cfg = dict(TINY, unrolled=unrolled)
    lines = []
    full = RNNSearch(RNNSearchConfig(**cfg), save_dir=str(tmp_path / "a"), log=lines.append, progress=False)
    assert isinstance(full.model, ESSRNNModel) and len(full.architect.optimizer.param_groups[0]["params"]) == 3
    before = [a.detach().clone() for a in full.model.arch_parameters()]
    out = full.run()
    assert len(out["history"]) == 2 and all(math.isfinite(r["val_ppl"]) for r in out["history"])
    assert all(not torch.equal(a, b) for a, b in zip(full.model.arch_parameters(), before))  # all three stepped
    genotype = from_json(json.dumps(out["genotype"]))
    assert isinstance(genotype, ESSGenotype) and genotype.inter.m == 3 and len(genotype.inter.f) == 3
    assert genotype == full.model.genotype()
    assert from_json((tmp_path / "a" / "genotype.json").read_text()) == genotype
    assert sum("val_ppl" in line and '"inter"' in line for line in lines) == 2
    again = run_rnn_search(RNNSearchConfig(**cfg), log=quiet, progress=False)  # the same seed: the same run
    assert again["genotype"] == out["genotype"]
    assert [r["val_loss"] for r in again["history"]] == [r["val_loss"] for r in out["history"]]
    part = RNNSearch(RNNSearchConfig(**cfg), save_dir=str(tmp_path / "b"), log=quiet, progress=False)
    part.run(until=1)
    resumed = run_rnn_search(RNNSearchConfig(**cfg), save_dir=str(tmp_path / "b"), resume=str(tmp_path / "b"),
                             log=quiet, progress=False)
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in out["history"]]
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in out["history"]]
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for k, v in full.model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k
    assert len(ckpt["alphas"]) == 3
    for a, b in zip(ckpt["alphas"], full.model.arch_parameters()):
        assert torch.equal(a, b.detach())


def test_train_rnn_on_a_derived_ess_genotype(tmp_path):
    torch.manual_seed(3)
    model = ESSRNNModel(20, 8, 8, 8, m=2, nodes=2)
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_()
    path = tmp_path / "genotype.json"
    path.write_text(to_json(model.genotype()) + "\n")
    cfg = RNNTrainConfig(genotype=str(path), emsize=8, nhid=8, batch_size=4, eval_batch_size=2, bptt=6, epochs=2,
                         steps_per_epoch=2, max_tokens=stdlib_min_tokens(16, 4, 2))
    from pynas.train.rnn import RNNTraining

    run = RNNTraining(cfg, save_dir=None, log=quiet, progress=False)
    assert isinstance(run.model, ESSModel) and run.model.rnns[0].genotype == model.genotype()
    out = run.run()
    assert len(out["history"]) == 2 and math.isfinite(out["test_ppl"])
    saved = tmp_path / "run"
    a = run_training(cfg, save_dir=str(saved), log=quiet, progress=False)
    assert a["test_ppl"] == out["test_ppl"]  # seeded
    ckpt = torch.load(saved / "checkpoint.pt", weights_only=True)
    assert from_json(ckpt["genotype"]) == model.genotype() and "rnns.0.f._Ws.1" in ckpt["model"]
    # a plain DARTS genotype still trains the DARTS model
    from pynas.rnn.model_eval import RNNModel

    plain = RNNTraining(RNNTrainConfig(**dict(vars(cfg), genotype="DARTS")), log=quiet, progress=False)
    assert type(plain.model) is RNNModel


def test_cli_search_ess_and_method_ess(tmp_path, capsys):
    small = ["--emsize", "8", "--nhid", "8", "--batch-size", "4", "--bptt", "4", "--epochs", "1",
             "--steps-per-epoch", "1", "--eval-batch-size", "4", "--max-tokens", str(stdlib_min_tokens(32, 8)),
             "--no-progress"]
    assert main(["search", "ess", "--save", str(tmp_path / "a")] + small) == 0
    out = capsys.readouterr().out
    assert "method ess" in out and "val_ppl" in out
    assert json.loads((tmp_path / "a" / "genotype.json").read_text())["inter"]["m"] == 3
    assert main(["search", "rnn", "--method", "ess", "--ess-m", "2", "--ess-nodes", "1",
                 "--save", str(tmp_path / "b")] + small) == 0
    capsys.readouterr()
    inter = json.loads((tmp_path / "b" / "genotype.json").read_text())["inter"]
    assert inter["m"] == 2 and len(inter["f"]) == len(inter["g"]) == 1
    assert main(["search", "ess", "--ess-m", "0", "--save", str(tmp_path / "c")] + small) == 2
    assert "ess_m" in capsys.readouterr().err
