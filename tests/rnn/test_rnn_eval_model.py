"""The DARTS RNN evaluation model against a plain functional model written here from its semantics
(docs/darts.md, "Evaluation network"): same weights (by state_dict name), same log-probabilities, losses and
gradients; dropout is checked where it is drawn (pynas.rnn.model_search), so the comparison runs without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pynas.rnn.genotypes import PUBLISHED, Genotype
from pynas.rnn.model_eval import DARTSCell, RNNModel

ACT = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda v: v}


def reference_forward(P, genotype, tokens, h0):
    """Embedding, the genotype's cell over the sequence (no BatchNorm), tied decoder, log-softmax."""
    H = h0.shape[-1]
    x_seq = P["encoder.weight"][tokens]  # (T, B, H)
    h = h0[0]
    outs = []
    for x in x_seq:
        c0h0 = torch.cat([x, h], 1) @ P["rnns.0._W0"]
        c0, hh0 = c0h0[:, :H].sigmoid(), c0h0[:, H:].tanh()
        states = [h + c0 * (hh0 - h)]
        for i, (name, j) in enumerate(genotype.recurrent):
            ch = states[j] @ P[f"rnns.0._Ws.{i}"]
            c, hh = ch[:, :H].sigmoid(), ACT[name](ch[:, H:])
            states.append(states[j] + c * (hh - states[j]))
        h = sum(states[k] for k in genotype.concat) / len(genotype.concat)
        outs.append(h)
    out = torch.stack(outs)
    logits = out @ P["encoder.weight"].t() + P["decoder.bias"]
    return F.log_softmax(logits, -1), h.unsqueeze(0)


GENOTYPES = {
    "DARTS_V1": PUBLISHED["DARTS_V1"],
    "DARTS_V2": PUBLISHED["DARTS_V2"],
    "short": Genotype(recurrent=[("identity", 0), ("tanh", 0), ("relu", 2)], concat=[0, 1, 3]),
}


@pytest.mark.parametrize("name", list(GENOTYPES))
@pytest.mark.parametrize("training", [True, False], ids=["train-no-dropout", "eval"])
def test_matches_the_reference(name, training):
    torch.manual_seed(0)
    g = GENOTYPES[name]
    model = RNNModel(50, 8, 8, 8, 0.0, 0.0, 0.0, 0.0, 0.0, g).double().train(training)
    with torch.no_grad():
        model.decoder.bias.normal_()
        for p in model.rnns[0].parameters():
            p.uniform_(-0.5, 0.5)
    tokens = torch.randint(0, 50, (6, 3))
    h0 = torch.randn(1, 3, 8, dtype=torch.float64)
    log_prob, hidden = model(tokens, [h0])
    P = dict(model.named_parameters())
    P["encoder.weight"] = model.encoder.weight
    ref, ref_h = reference_forward(P, g, tokens, h0)
    torch.testing.assert_close(log_prob, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden[0], ref_h, rtol=1e-12, atol=1e-12)
    targets = torch.randint(0, 50, (18,))
    loss = F.nll_loss(log_prob.view(-1, 50), targets)
    ref_loss = F.nll_loss(ref.view(-1, 50), targets)
    params = list(model.parameters())
    for a, b, (n, _) in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params),
                            model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)


def test_names_and_tied_decoder():
    model = RNNModel(30, 6, 6, 6, 0.75, 0.25, 0.75, 0.2, 0.1, PUBLISHED["DARTS"])
    keys = set(model.state_dict())
    assert {"encoder.weight", "decoder.weight", "decoder.bias", "rnns.0._W0"} <= keys
    assert {f"rnns.0._Ws.{i}" for i in range(8)} <= keys and not any("bn" in k for k in keys)
    assert model.decoder.weight is model.encoder.weight
    assert model.rnns[0]._W0.shape == (12, 12) and model.rnns[0]._Ws[0].shape == (6, 12)


def test_dropout_in_training_only():
    torch.manual_seed(0)
    model = RNNModel(30, 6, 6, 6, 0.5, 0.5, 0.5, 0.5, 0.1, PUBLISHED["DARTS"])
    tokens = torch.randint(0, 30, (4, 2))
    h0 = model.init_hidden(2)
    model.eval()
    a, _ = model(tokens, h0)
    b, _ = model(tokens, h0)
    torch.testing.assert_close(a, b)
    model.train()
    c, _ = model(tokens, h0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kw,match", [
    (dict(ninp=4), "ninp, nhid, nhidlast: expected equal sizes"),
    (dict(dropout=1.0), "dropout: expected a probability"),
    (dict(genotype="DARTS"), "genotype: expected an RNN Genotype"),
])
def test_bad_arguments_are_named(kw, match):
    args = dict(ntoken=10, ninp=6, nhid=6, nhidlast=6, dropout=0.1, dropouth=0.1, dropoutx=0.1, dropouti=0.1,
                dropoute=0.1, genotype=PUBLISHED["DARTS"])
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        RNNModel(**args)


def test_cell_shapes():
    cell = DARTSCell(5, 7, 0.2, 0.3, PUBLISHED["DARTS_V1"])
    out, last = cell(torch.randn(4, 3, 5), torch.zeros(1, 3, 7))
    assert out.shape == (4, 3, 7) and last.shape == (1, 3, 7)
