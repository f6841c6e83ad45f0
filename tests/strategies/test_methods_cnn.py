"""I-DARTS, PC-DARTS, GDAS and random search with weight sharing on the CNN space against a plain functional
supernet written in the tests from their semantics (_supernet_ref.py; pynas/strategies/<method>.py): float64
logits, every gradient (weights, alphas, betas), BatchNorm running statistics, seeded samples, and a few search
iterations of each method following the reference trajectory; the genotype rules on hand-made alphas."""
from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F

import _supernet_ref as ref
from pynas import _backend
from pynas.cnn import PRIMITIVES
from pynas.cnn.genotypes import Genotype, parse_cell, parse_cell_pairs
from pynas.search.cnn import CNNSearch, CNNSearchConfig
from pynas.strategies.gdas import GDASNetwork, gumbel_hard
from pynas.strategies.idarts import IDARTSNetwork
from pynas.strategies.pcdarts import PCDARTSNetwork, channel_shuffle
from pynas.strategies.rsws import RSWSNetwork

BACKENDS = [b for b in ("reference", "cpu") if _backend.backends().get(b) is None]
STEPS = 4
SIZES = [2 + i for i in range(STEPS)]


def _node_softmax(t):
    """Each node's block under one softmax (written here, not taken from pynas)."""
    out, start = [], 0
    for n in SIZES:
        block = t[start:start + n]
        out.append(torch.softmax(block.flatten(), 0).view(block.shape))
        start += n
    return torch.cat(out)


def _build(cls, seed=0, C=4, layers=3, classes=5, **kw):
    torch.manual_seed(seed)
    net = cls(C, classes, layers, **kw).double()
    with torch.no_grad():  # alphas away from uniform, so that the methods' weights differ visibly
        for a in net.arch_parameters():
            a.copy_(torch.randn(a.shape, dtype=a.dtype))
    return net


def _data(seed=1, N=4, hw=8, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, hw, hw, generator=g, dtype=torch.float64), torch.randint(0, classes, (N,), generator=g)


def _close(a, b, what, tol=1e-10):
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-12)
    assert err <= tol * max(scale, 1.0), f"{what}: max difference {err:.3g} (scale {scale:.3g})"


def _compare(net, plans_fn, x, y, backend, seed=11):
    """pynas's forward and backward against the reference's, on the same weights; ``plans_fn()`` builds the
    reference's plans (after the seed is set, so that a sampling method draws the same numbers)."""
    params = [p for _, p in net.named_parameters()]
    names = [n for n, _ in net.named_parameters()]
    alphas = list(net.arch_parameters())
    P, R = ref.params_and_stats(net)
    with _backend.use_backend(backend):
        torch.manual_seed(seed)
        logits = net(x)
    loss = F.cross_entropy(logits, y)
    got = torch.autograd.grad(loss, params + alphas, allow_unused=True)
    torch.manual_seed(seed)
    plans = plans_fn()
    want_logits = ref.forward(P, R, x, len(net.cells), plans)
    want = torch.autograd.grad(F.cross_entropy(want_logits, y), params + alphas, allow_unused=True)
    _close(logits, want_logits, "logits")
    for name, g, w in zip(names + [f"arch {i}" for i in range(len(alphas))], got, want):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None:
            _close(g, w, f"grad {name}")
    for name, b in net.named_buffers():
        if b.dtype != torch.long:
            _close(b, R[name], f"buffer {name}")
        else:
            assert int(b) == int(R[name]), f"buffer {name}: {int(b)} != {int(R[name])}"
    return plans


# -- I-DARTS --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_idarts_matches_the_reference(backend):
    net = _build(IDARTSNetwork)
    x, y = _data()
    _compare(net, lambda: [{"weights": _node_softmax(a)} for a in (net.alphas_normal, net.alphas_reduce)], x, y,
             backend)


def test_idarts_weights_sum_to_one_per_node_and_node0_is_darts():
    net = _build(IDARTSNetwork)
    w_normal, _ = net.cell_weights()
    start = 0
    for n in SIZES:
        assert abs(float(w_normal[start:start + n].detach().sum()) - 1.0) < 1e-12
        start += n
    # a node with one incoming edge would be DARTS's softmax; node 0 has two: its block is one distribution
    local = torch.softmax(net.alphas_normal[:2].flatten(), 0).view(2, -1)
    _close(w_normal[:2], local, "node 0")


def test_idarts_cnn_genotype_keeps_two_ops_on_one_input():
    alphas = torch.zeros(sum(SIZES), len(PRIMITIVES), dtype=torch.float64)
    sep3, dil5 = PRIMITIVES.index("sep_conv_3x3"), PRIMITIVES.index("dil_conv_5x5")
    alphas[0, sep3] = 5.0  # node 0: both strong pairs on input 0
    alphas[0, dil5] = 4.0
    alphas[1, sep3] = 3.0
    alphas[0, PRIMITIVES.index("none")] = 9.0  # 'none' never kept
    genes = parse_cell_pairs(_node_softmax(alphas), STEPS)
    assert genes[:2] == [("sep_conv_3x3", 0), ("dil_conv_5x5", 0)]
    genes = parse_cell_pairs(_node_softmax(alphas), STEPS, distinct_inputs=True)
    assert genes[:2] == [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)]
    # DARTS's rule takes two distinct edges
    assert sorted(parse_cell(torch.softmax(alphas, -1), STEPS)[:2]) == [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)]


def test_idarts_network_genotype_uses_the_joint_rule():
    net = _build(IDARTSNetwork, seed=3)
    want = parse_cell_pairs(_node_softmax(net.alphas_normal.detach()), STEPS)
    assert net.genotype().normal == want


# -- PC-DARTS -------------------------------------------------------------------------------------------------


def _pc_plans(net, k):
    return [{"weights": torch.softmax(a, -1), "edge_scale": _node_softmax(b), "k": k}
            for a, b in ((net.alphas_normal, net.betas_normal), (net.alphas_reduce, net.betas_reduce))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 4])
def test_pcdarts_matches_the_reference(backend, k):
    net = _build(PCDARTSNetwork, C=4, partial_channels=k)
    assert len(net.arch_parameters()) == 4
    x, y = _data()
    _compare(net, lambda: _pc_plans(net, k), x, y, backend)


def test_pcdarts_shuffle_puts_processed_channels_at_multiples_of_k():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    out = channel_shuffle(x, 4)
    assert out.flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]  # channels 0, 1 (group 0) at 0 and 4


def test_pcdarts_genotype_ranks_edges_by_beta_times_alpha():
    net = _build(PCDARTSNetwork, C=4, partial_channels=2)
    with torch.no_grad():
        for t in net.arch_parameters():
            t.zero_()
        sep3 = PRIMITIVES.index("sep_conv_3x3")
        # node 0: edge 0 has the strongest op, but edge 1's beta is far larger: the product prefers edge 1
        net.alphas_normal[0, sep3] = 2.0
        net.alphas_normal[1, PRIMITIVES.index("max_pool_3x3")] = 1.0
        net.betas_normal[1] = 3.0
    genes = net.genotype().normal
    assert genes[0] == ("max_pool_3x3", 1)
    assert genes[1] == ("sep_conv_3x3", 0)


def test_pcdarts_channels_must_divide():
    with pytest.raises(ValueError, match="partial_channels"):
        CNNSearch(CNNSearchConfig.for_method("pcdarts", init_channels=6, partial_channels=4, num_train=8, epochs=1))


# -- GDAS -----------------------------------------------------------------------------------------------------


def _gdas_plans(net, straight):
    plans = []
    for a in (net.alphas_normal, net.alphas_reduce):
        g = -torch.empty_like(a).exponential_().log()
        probs = torch.softmax((torch.log_softmax(a, -1) + g) / net.tau, -1)
        index = probs.argmax(-1)
        hard = F.one_hot(index, a.shape[1]).to(a.dtype) - probs.detach() + probs
        plans.append({"weights": hard, "selected": [(int(i),) for i in index], "straight_through": straight})
    return plans


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unselected", ["scalar", "drop"])
def test_gdas_matches_the_reference(backend, unselected):
    net = _build(GDASNetwork, unselected=unselected)
    net.tau = 0.7
    x, y = _data()
    plans = _compare(net, lambda: _gdas_plans(net, unselected == "scalar"), x, y, backend)
    assert net.last_index == [[s[0] for s in p["selected"]] for p in plans]  # the same samples


def test_gdas_scalar_terms_give_every_alpha_of_an_edge_a_gradient():
    net = _build(GDASNetwork, unselected="scalar")
    x, y = _data()
    torch.manual_seed(5)
    loss = F.cross_entropy(net(x), y)
    g = torch.autograd.grad(loss, net.alphas_normal)[0]
    assert (g != 0).all()
    net = _build(GDASNetwork, unselected="drop")
    torch.manual_seed(5)
    g_drop = torch.autograd.grad(F.cross_entropy(net(x), y), net.alphas_normal)[0]
    assert not torch.allclose(g, g_drop)


def test_gdas_computes_one_candidate_per_edge():
    net = _build(GDASNetwork)
    calls = []
    for cell in net.cells:
        for e, op in enumerate(cell._ops):
            for k, cand in enumerate(op._ops):
                cand.register_forward_hook(lambda m, i, o, key=(id(cell), e): calls.append(key))
    x, _ = _data()
    with _backend.use_backend("reference"):
        torch.manual_seed(2)
        net(x)
    picked = net.last_index
    expected = sum(1 for cell in net.cells for k in picked[1 if cell.reduction else 0] if PRIMITIVES[k] != "none")
    assert len(calls) == expected
    assert len(set(calls)) == len(calls)  # never two candidates of an edge


def test_gdas_samples_follow_softmax_alpha_at_every_tau():
    torch.manual_seed(0)
    alpha = torch.randn(1, len(PRIMITIVES), dtype=torch.float64)
    p = torch.softmax(alpha, -1)[0]
    n = 20000
    for tau in (10.0, 0.1):
        counts = torch.zeros(len(PRIMITIVES), dtype=torch.float64)
        for _ in range(n // 500):
            a = alpha.expand(500, -1).contiguous()
            _, index = gumbel_hard(a, tau)
            counts += torch.bincount(index, minlength=len(PRIMITIVES)).double()
        assert (counts / n - p).abs().max() < 0.015, (tau, counts / n, p)


def test_gdas_resamples_a_non_finite_draw(monkeypatch):
    alpha = torch.zeros(2, 3, dtype=torch.float64)
    draws = iter([torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)])
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self: self.copy_(next(draws)))
    hard, index = gumbel_hard(alpha, 1.0)  # the first draw, E = 0, gives g = inf: redrawn
    assert torch.isfinite(hard).all() and index.tolist() == [0, 0]


def test_gdas_eval_takes_the_argmax():
    net = _build(GDASNetwork).eval()
    normal, _ = net.cell_weights()
    assert [s[0] for s in normal.selected] == net.alphas_normal.argmax(-1).tolist()
    assert not normal.straight_through


def test_gdas_tau_schedule():
    cfg = CNNSearchConfig.for_method("gdas", epochs=5, num_train=16, init_channels=2, layers=1, batch_size=4)
    search = CNNSearch(cfg, progress=False, log=lambda s: None)
    taus = [search.method.tau(e) for e in range(5)]
    assert taus[0] == 10.0 and abs(taus[-1] - 0.1) < 1e-12
    assert all(abs((taus[i] - taus[i + 1]) - (10.0 - 0.1) / 4) < 1e-12 for i in range(4))
    with pytest.raises(ValueError, match="unrolled"):
        CNNSearch(CNNSearchConfig.for_method("gdas", unrolled=True, num_train=16))


# -- random search with weight sharing ------------------------------------------------------------------------


def _arch(seed=0):
    from pynas.strategies.random_search import sample_cnn_genotype

    return sample_cnn_genotype(random.Random(seed), steps=STEPS, multiplier=4, allow_none=True)


def _onehot_plans(arch, single):
    plans = []
    for genes in (arch.normal, arch.reduce):
        w = torch.zeros(sum(SIZES), len(PRIMITIVES), dtype=torch.float64)
        sel = [set() for _ in range(sum(SIZES))]
        start = 0
        for i in range(STEPS):
            for op, j in genes[2 * i:2 * i + 2]:
                w[start + j, PRIMITIVES.index(op)] = 1.0
                sel[start + j].add(PRIMITIVES.index(op))
            start += 2 + i
        plans.append({"weights": w, "selected": [tuple(sorted(s)) for s in sel] if single else None})
    return plans


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["single", "supernet"])
def test_rsws_matches_the_reference(backend, path):
    net = _build(RSWSNetwork, path=path)
    for seed in (0, 1):
        arch = _arch(seed)
        net.set_arch(arch)
        x, y = _data(seed)
        _compare(net, lambda: _onehot_plans(arch, path == "single"), x, y, backend)


def test_rsws_single_path_moves_only_the_sampled_statistics():
    net = _build(RSWSNetwork, path="single")
    arch = Genotype(normal=[("sep_conv_3x3", 0), ("max_pool_3x3", 1)] * 4, normal_concat=[2, 3, 4, 5],
                    reduce=[("skip_connect", 0), ("skip_connect", 1)] * 4, reduce_concat=[2, 3, 4, 5])
    net.set_arch(arch)
    before = {n: b.clone() for n, b in net.named_buffers()}
    x, _ = _data()
    net(x)
    moved = {n for n, b in net.named_buffers() if not torch.equal(b, before[n])}
    sep3, avg = PRIMITIVES.index("sep_conv_3x3"), PRIMITIVES.index("avg_pool_3x3")
    assert "cells.0._ops.0._ops.%d.op.3.running_mean" % sep3 in moved
    assert not any(re.search(rf"\._ops\.\d+\._ops\.{avg}\.", n) for n in moved)  # avg pool never sampled


# -- a few search iterations follow the reference trajectory -------------------------------------------------


TINY = dict(num_train=32, batch_size=4, init_channels=4, layers=3, epochs=2, steps_per_epoch=2, seed=3)


def _reference_plans(method, net, alphas, tau, arch):
    if method == "idarts":
        return [{"weights": _node_softmax(a)} for a in alphas[:2]]
    if method == "pcdarts":
        return [{"weights": torch.softmax(a, -1), "edge_scale": _node_softmax(b), "k": 2}
                for a, b in zip(alphas[:2], alphas[2:])]
    if method == "gdas":
        class _A:  # the alphas as _gdas_plans reads them
            pass
        obj = _A()
        obj.alphas_normal, obj.alphas_reduce, obj.tau = alphas[0], alphas[1], tau
        return _gdas_plans(obj, True)
    if method == "rsws":
        return _onehot_plans(arch, True)
    return [{"weights": torch.softmax(a, -1)} for a in alphas[:2]]


@pytest.mark.parametrize("method", ["darts", "idarts", "pcdarts", "gdas", "rsws"])
def test_search_iterations_follow_the_reference(method):
    extra = {"partial_channels": 2, "warmup_epochs": 1} if method == "pcdarts" else {}
    cfg = CNNSearchConfig.for_method(method, **TINY, **extra, backend="cpu" if "cpu" in BACKENDS else "reference")
    search = CNNSearch(cfg, progress=False, log=lambda s: None)
    search.model.double()
    net = search.model
    search.optimizer = search.method.build_optimizer(net)
    search.architect = search.method.build_architect(net)
    names = [n for n, _ in net.named_parameters()]
    P = ref.leaf_copies(net)
    R = {n: b.detach().clone() for n, b in net.named_buffers()}
    A = [a.detach().clone().requires_grad_(True) for a in net.arch_parameters()]
    sgd = torch.optim.SGD([P[n] for n in names], lr=cfg.learning_rate, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    adam = torch.optim.Adam(A, lr=cfg.arch_learning_rate, betas=(0.5, 0.999), weight_decay=cfg.arch_weight_decay) \
        if A else None
    g = torch.Generator().manual_seed(9)
    layers = cfg.layers

    def weight_step(x, y, arch, tau):
        sgd.zero_grad()
        loss = F.cross_entropy(ref.forward(P, R, x, layers, _reference_plans(method, net, A, tau, arch)), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([P[n] for n in names], cfg.grad_clip)
        sgd.step()

    def arch_step(xv, yv, tau):
        adam.zero_grad()
        loss = F.cross_entropy(ref.forward(P, R, xv, layers, _reference_plans(method, net, A, tau, None)), yv)
        grads = torch.autograd.grad(loss, A, allow_unused=True)
        for a, gr in zip(A, grads):
            a.grad = torch.zeros_like(a) if gr is None else gr
        adam.step()

    for epoch in range(2):
        search.method.start_epoch(epoch)
        rng = random.Random(cfg.seed * 1000003 + epoch)
        for it in range(2):
            x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
            y = torch.randint(0, 10, (4,), generator=g)
            xv = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
            yv = torch.randint(0, 10, (4,), generator=g)
            torch.manual_seed(100 * epoch + it)
            search.method.iteration(x, y, xv, yv, cfg.learning_rate, epoch)
            torch.manual_seed(100 * epoch + it)
            tau = search.method.tau(epoch) if method == "gdas" else None
            if method == "rsws":
                from pynas.strategies.random_search import sample_cnn_genotype

                weight_step(x, y, sample_cnn_genotype(rng, steps=STEPS, multiplier=4, allow_none=True), None)
            elif method == "gdas":
                weight_step(x, y, None, tau)
                arch_step(xv, yv, tau)
            else:
                if epoch >= cfg.warmup_epochs:
                    arch_step(xv, yv, None)
                weight_step(x, y, None, None)
    for n, p in net.named_parameters():
        _close(p.detach(), P[n].detach(), f"weight {n}", tol=1e-9)
    for i, (a, b) in enumerate(zip(net.arch_parameters(), A)):
        _close(a.detach(), b.detach(), f"arch tensor {i}", tol=1e-9)
    for n, b in net.named_buffers():
        if b.dtype != torch.long:
            _close(b, R[n], f"buffer {n}", tol=1e-9)
        else:
            assert int(b) == int(R[n]), n
    if method == "pcdarts":  # the warm-up epoch left the architecture alone
        assert search.method.cfg.warmup_epochs == 1


# -- runs, checkpoints and resume ------------------------------------------------------------------------------


RUN = dict(num_train=32, batch_size=4, init_channels=4, layers=3, epochs=2, steps_per_epoch=2, seed=5,
           rsws_samples=4, rsws_top=2, rsws_eval_batches=1)


def _figures(history):
    return [{k: v for k, v in r.items() if k not in ("seconds",)} for r in history]


@pytest.mark.parametrize("method", ["idarts", "pcdarts", "gdas", "rsws"])
def test_method_search_resumes_exactly(tmp_path, method):
    from pynas.search.cnn import run_search

    extra = {"partial_channels": 2, "warmup_epochs": 1} if method == "pcdarts" else {}
    quiet = lambda s: None  # noqa: E731
    cfg = CNNSearchConfig.for_method(method, **RUN, **extra)
    full = run_search(cfg, save_dir=str(tmp_path / "full"), log=quiet, progress=False)
    part = CNNSearch(CNNSearchConfig.for_method(method, **RUN, **extra), save_dir=str(tmp_path / "part"), log=quiet,
                     progress=False)
    part.run(until=1)
    resumed = run_search(cfg, save_dir=str(tmp_path / "part"), resume=str(tmp_path / "part"), log=quiet,
                         progress=False)
    assert resumed["genotype"] == full["genotype"]
    assert repr(_figures(resumed["history"])) == repr(_figures(full["history"]))
    for name in ("genotype.json", "genotype.svg", "metrics.csv", "checkpoint.pt"):
        assert (tmp_path / "full" / name).exists(), name
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    if method == "rsws":
        final = ckpt["final"]
        assert final["samples"] == 4 and len(final["top"]) == 2
        best = min(final["top"], key=lambda r: (r["valid_error"], r["sample"]))
        assert json_genotype(best["genotype"]) == full["genotype"]
        # a finished run resumed again does not select anew
        again = run_search(cfg, save_dir=str(tmp_path / "full"), resume=str(tmp_path / "full"), log=quiet,
                           progress=False)
        assert again["genotype"] == full["genotype"]
    else:
        assert ckpt["final"] is None
        assert len(ckpt["alphas"]) == (4 if method == "pcdarts" else 2)


def json_genotype(text):
    import json

    return json.loads(text)


def test_pcdarts_warmup_leaves_the_architecture_alone():
    cfg = CNNSearchConfig.for_method("pcdarts", **RUN, partial_channels=2, warmup_epochs=1)
    search = CNNSearch(cfg, progress=False, log=lambda s: None)
    before = [a.detach().clone() for a in search.model.arch_parameters()]
    search.run(until=1)
    assert all(torch.equal(a, b) for a, b in zip(search.model.arch_parameters(), before))
    search.run()  # the second epoch steps alphas and betas
    assert all(not torch.equal(a, b) for a, b in zip(search.model.arch_parameters(), before))
    with pytest.raises(ValueError, match="warmup_epochs"):
        CNNSearch(CNNSearchConfig.for_method("pcdarts", **{**RUN, "epochs": 1}, partial_channels=2, warmup_epochs=1))


def test_method_defaults_and_errors():
    cfg = CNNSearchConfig.for_method("pcdarts")
    assert (cfg.batch_size, cfg.learning_rate, cfg.learning_rate_min, cfg.arch_learning_rate, cfg.warmup_epochs,
            cfg.epochs) == (256, 0.1, 0.0, 6e-4, 15, 50)
    cfg = CNNSearchConfig.for_method("gdas")
    assert cfg.nesterov and cfg.weight_decay == 5e-4 and cfg.epochs == 250 and cfg.layers == 6
    assert CNNSearchConfig.for_method("gdas", epochs=3).epochs == 3
    with pytest.raises(ValueError, match="method"):
        CNNSearchConfig.for_method("enas")
    with pytest.raises(ValueError, match="tau_min"):
        CNNSearch(CNNSearchConfig.for_method("gdas", tau_max=1.0, tau_min=2.0, num_train=16))
    with pytest.raises(ValueError, match="rsws_top"):
        CNNSearch(CNNSearchConfig.for_method("rsws", rsws_samples=2, rsws_top=3, num_train=16))
    with pytest.raises(ValueError, match="track_hessian"):
        CNNSearch(CNNSearchConfig.for_method("rsws", track_hessian=True, num_train=16))
    with pytest.raises(ValueError, match="gdas_unselected"):
        CNNSearch(CNNSearchConfig.for_method("gdas", gdas_unselected="all", num_train=16))


@pytest.mark.parametrize("cls, kw", [(IDARTSNetwork, {}), (PCDARTSNetwork, {"partial_channels": 2})],
                         ids=["idarts", "pcdarts"])
def test_second_order_step_fused_equals_the_modules(cls, kw):
    """DARTS's unrolled step on the methods' networks (alphas and, for PC-DARTS, betas), fused against module
    by module, and every arch tensor gets a gradient."""
    from pynas.strategies.darts import CNNArchitect

    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    results = []
    for backend in ("reference", "cpu"):
        net = _build(cls, seed=4, **kw)
        opt = torch.optim.SGD(net.parameters(), 0.05, momentum=0.9, weight_decay=3e-4)
        arch = CNNArchitect(net)
        x, y = _data(5)
        xv, yv = _data(6)
        with _backend.use_backend(backend):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()  # a momentum buffer for the virtual step
            results.append(arch.unrolled_grad(x, y, xv, yv, 0.05, opt))
    assert len(results[0]) == len(net.arch_parameters())
    for a, b in zip(*results):
        assert b.abs().sum() > 0
        _close(b, a, "second-order arch gradient", tol=1e-8)


@pytest.mark.parametrize("bad", [None, {}, {"top": [], "best": 0}, {"top": [{"sample": 1, "genotype": "{}"}], "best": 0}])
def test_rsws_malformed_selection_record_is_a_resume_error(bad):
    from pynas.strategies.rsws import _best_of

    with pytest.raises(ValueError, match="resume: the checkpoint's 'final'"):
        _best_of(bad)
