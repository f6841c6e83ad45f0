"""I-DARTS on the RNN space against a plain cell written here from its semantics (pynas/strategies/idarts.py):
one softmax over each node's (inputs x candidates) block, 'none' inside; the genotype rule of the author's code
(``_parse_global``) on hand-made weights; a short search runs and resumes exactly."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pynas import _backend
from pynas.rnn import CONCAT, PRIMITIVES, STEPS
from pynas.rnn.genotypes import parse_recurrent
from pynas.search.rnn import RNNSearch, RNNSearchConfig, run_rnn_search
from pynas.strategies.idarts import IDARTSRNNModel, parse_recurrent_joint, rnn_probs

BACKENDS = [b for b in ("reference", "cpu") if _backend.backends().get(b) is None]
ACTS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda t: t}


def _joint(weights):
    out, start = [], 0
    for i in range(STEPS):
        block = weights[start:start + i + 1]
        out.append(torch.softmax(block.flatten(), 0).view(block.shape))
        start += i + 1
    return torch.cat(out)


def _ref_cell(cell, inputs, h, probs, running):
    """The search cell without dropout (dropouth = dropoutx = 0), training-mode BatchNorm (no affine) whose running
    statistics are kept in ``running`` (mean, var)."""
    nhid = cell.nhid

    def bn(t):
        return F.batch_norm(t, running[0], running[1], None, None, True, 0.1, 1e-5)

    outs = []
    for t in range(inputs.shape[0]):
        c0, h0 = torch.split(torch.cat([inputs[t], h], -1).mm(cell._W0), nhid, -1)
        states = [bn(h + c0.sigmoid() * (h0.tanh() - h))]
        offset = 0
        for i in range(STEPS):
            s = 0
            for j, prev in enumerate(states):
                c, hh = torch.split(prev.mm(cell._Ws[i]), nhid, -1)
                c = c.sigmoid()
                for k, name in enumerate(PRIMITIVES):
                    if name != "none":
                        s = s + probs[offset + j, k] * (prev + c * (ACTS[name](hh) - prev))
            states.append(bn(s))
            offset += i + 1
        h = torch.stack(states[-CONCAT:]).mean(0)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_idarts_cell_matches_the_reference(backend):
    torch.manual_seed(0)
    model = IDARTSRNNModel(20, 6, 6, 6, 0.0, 0.0, 0.0, 0.0, 0.0).double()
    with torch.no_grad():
        model.weights.copy_(torch.randn_like(model.weights))
    cell = model.rnns[0]
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    h = torch.randn(1, 4, 6, dtype=torch.float64)
    running = [cell.bn.running_mean.clone(), cell.bn.running_var.clone()]
    params = [cell._W0, *cell._Ws, model.weights]
    with _backend.use_backend(backend):
        got, _ = cell(x, h)
    g_got = torch.autograd.grad(got.square().sum(), params)
    want = _ref_cell(cell, x, h[0], _joint(model.weights), running)
    g_want = torch.autograd.grad(want.square().sum(), params)
    assert (got - want).abs().max() < 1e-10
    for a, b in zip(g_got, g_want):
        assert (a - b).abs().max() < 1e-9 * max(1.0, b.abs().max().item())
    assert (cell.bn.running_mean - running[0]).abs().max() < 1e-12
    assert (cell.bn.running_var - running[1]).abs().max() < 1e-12


def test_joint_probabilities():
    w = torch.randn(36, 5, dtype=torch.float64)
    p = rnn_probs(w, STEPS)
    start = 0
    for i in range(STEPS):
        assert abs(float(p[start:start + i + 1].sum()) - 1.0) < 1e-12
        start += i + 1
    assert torch.allclose(p[0], torch.softmax(w[0], 0))  # node 0 has one input: DARTS's softmax
    assert torch.allclose(p, _joint(w))


def test_genotype_rule_forbids_s0_after_the_first_node():
    w = torch.full((36, 5), -5.0, dtype=torch.float64)
    relu, tanh = PRIMITIVES.index("relu"), PRIMITIVES.index("tanh")
    start = 0
    for i in range(STEPS):
        w[start, relu] = 3.0  # s0 is every node's best input
        if i > 0:
            w[start + i, tanh] = 1.0  # the previous node the second best
        start += i + 1
    probs = _joint(w)
    genes = parse_recurrent_joint(probs, STEPS, PRIMITIVES)
    assert genes[0] == ("relu", 0)
    assert all(g == ("tanh", i) for i, g in enumerate(genes[1:], start=1))
    allowed = parse_recurrent_joint(probs, STEPS, PRIMITIVES, forbid_s0=False)
    assert all(g == ("relu", 0) for g in allowed)
    # 'none' inside the normaliser but never chosen
    w2 = w.clone()
    w2[:, PRIMITIVES.index("none")] = 50.0
    assert parse_recurrent_joint(_joint(w2), STEPS, PRIMITIVES) == genes


def test_joint_and_local_rules_can_differ():
    w = torch.zeros(36, 5, dtype=torch.float64)
    # node 1 (rows 1, 2): input 0 has one strong candidate and a strong 'none', input 1 a moderate one
    w[1, PRIMITIVES.index("none")] = 6.0
    w[1, PRIMITIVES.index("relu")] = 4.0
    w[2, PRIMITIVES.index("tanh")] = 2.0
    local = parse_recurrent(torch.softmax(w, -1), STEPS)
    joint = parse_recurrent_joint(_joint(w), STEPS, PRIMITIVES, forbid_s0=False)
    assert local[1] == ("tanh", 1) and joint[1] == ("relu", 0)


TINY = dict(method="idarts", max_tokens=20000, emsize=8, nhid=8, nhidlast=8, batch_size=4, eval_batch_size=2,
            bptt=5, epochs=2, steps_per_epoch=3)


def test_idarts_rnn_search_runs_and_resumes_exactly(tmp_path):
    quiet = lambda s: None  # noqa: E731
    full = run_rnn_search(RNNSearchConfig(**TINY), save_dir=str(tmp_path / "a"), log=quiet, progress=False)
    search = RNNSearch(RNNSearchConfig(**TINY), save_dir=str(tmp_path / "b"), log=quiet, progress=False)
    assert isinstance(search.model, IDARTSRNNModel)
    search.run(until=1)
    resumed = run_rnn_search(RNNSearchConfig(**TINY), save_dir=str(tmp_path / "b"),
                             resume=str(tmp_path / "b"), log=quiet, progress=False)
    assert resumed["genotype"] == full["genotype"]
    # repr: nan == nan (an untrained I-DARTS cell can diverge over the long validation text in eval mode)
    assert repr([r["train_loss"] for r in resumed["history"]]) == repr([r["train_loss"] for r in full["history"]])
    assert repr([r["val_loss"] for r in resumed["history"]]) == repr([r["val_loss"] for r in full["history"]])
    assert len(full["genotype"]["recurrent"]) == STEPS


def test_unknown_rnn_method_is_named():
    with pytest.raises(ValueError, match="method"):
        RNNSearch(RNNSearchConfig(method="gdas"))


def test_rsws_rnn_search_samples_cells_selects_and_resumes_exactly(tmp_path):
    from pynas.rnn.genotypes import from_json
    from pynas.strategies.random_search import sample_rnn_genotype

    cfg = dict(TINY, method="rsws", rsws_samples=4, rsws_top=2, rsws_eval_batches=2)
    quiet = lambda s: None  # noqa: E731
    full = run_rnn_search(RNNSearchConfig.for_method(**cfg), save_dir=str(tmp_path / "a"), log=quiet, progress=False)
    part = RNNSearch(RNNSearchConfig.for_method(**cfg), save_dir=str(tmp_path / "b"), log=quiet, progress=False)
    assert part.architect is None and part.model.arch_parameters() == []
    part.run(until=1)
    # the epoch's last batch's cell is the sampler's last draw for that epoch
    import random

    rng = random.Random(part.cfg.seed * 1000003 + 0)
    draws = [sample_rnn_genotype(rng) for _ in range(part.history[0]["steps"])]
    assert part.model.genotype() == draws[-1]
    resumed = run_rnn_search(RNNSearchConfig.for_method(**cfg), save_dir=str(tmp_path / "b"),
                             resume=str(tmp_path / "b"), log=quiet, progress=False)
    assert resumed["genotype"] == full["genotype"]
    assert repr([r["val_loss"] for r in resumed["history"]]) == repr([r["val_loss"] for r in full["history"]])
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    best = min(ckpt["final"]["top"], key=lambda r: (r["valid_nll"], r["sample"]))
    assert from_json(best["genotype"]) == from_json(json.dumps(full["genotype"]))
    assert RNNSearchConfig.for_method("rsws").batch_size == 64


def test_rsws_rnn_refuses_architecture_settings():
    with pytest.raises(ValueError, match="unrolled"):
        RNNSearch(RNNSearchConfig.for_method("rsws", unrolled=True, **{k: v for k, v in TINY.items() if k != "method"}))
