"""pynas.search.hessian (Hessian-vector products, the dominant eigenvalue, DARTS-ES) and --track-hessian in the searches."""
import json
import math

import pytest
import torch
from torch import nn

import pynas
from pynas.cli import main
from pynas.cnn import Network
from pynas.search.hessian import EigenvalueEarlyStop, dominant_eigenvalue, hessian_vector_product
from pynas.search import CNNSearch, CNNSearchConfig, load_checkpoint, run_search

TINY = dict(num_train=8, batch_size=4, init_channels=2, layers=1, steps_per_epoch=1)


def _quiet(_line):
    pass


def _tiny_net(seed=0):
    """A float64 supernet whose normal and reduction cells are both used (3 layers: normal, reduce, reduce), with
    one node per cell, its alphas moved off their near-zero start so that the Hessian has some structure."""
    torch.manual_seed(seed)
    net = Network(2, 10, 3, nn.CrossEntropyLoss(), steps=1, multiplier=1).double()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=g)
    return net, x, y


def _full_hessian(net, x, y):
    """The Hessian of the loss w.r.t. all alphas together, by torch.autograd.functional.hessian (reference)."""
    alphas = net.arch_parameters()

    def f(a, b):
        old = net.alphas_normal, net.alphas_reduce
        net.alphas_normal, net.alphas_reduce = a, b
        try:
            return net._loss(x, y)
        finally:
            net.alphas_normal, net.alphas_reduce = old

    blocks = torch.autograd.functional.hessian(f, tuple(a.detach() for a in alphas))
    n = [a.numel() for a in alphas]
    return torch.cat([torch.cat([blocks[i][j].reshape(n[i], n[j]) for j in range(len(n))], 1)
                      for i in range(len(n))], 0)


def test_dominant_eigenvalue_matches_eigvalsh():
    net, x, y = _tiny_net()
    with pynas.use_backend("reference"):
        H = _full_hessian(net, x, y)
        assert torch.allclose(H, H.T, atol=1e-10)
        eigs = torch.linalg.eigvalsh(H)
        expected = eigs[eigs.abs().argmax()].item()
        ev, vec = dominant_eigenvalue(lambda: net._loss(x, y), net.arch_parameters(), iters=2000, tol=1e-13)
    assert ev == pytest.approx(expected, rel=1e-6)
    assert vec.shape == (H.shape[0],) and vec.norm().item() == pytest.approx(1.0)
    assert torch.allclose(H @ vec, ev * vec, atol=1e-4 * abs(ev))


def test_hessian_vector_product_matches_the_full_hessian():
    net, x, y = _tiny_net(seed=3)
    with pynas.use_backend("reference"):
        H = _full_hessian(net, x, y)
        v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        flat = hessian_vector_product(lambda: net._loss(x, y), net.arch_parameters(), v)
        split = [v[:16].view(2, 8), v[16:].view(2, 8)]
        listed = hessian_vector_product(lambda: net._loss(x, y), net.arch_parameters(), split)
    assert torch.allclose(flat, H @ v, rtol=1e-9, atol=1e-12)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in listed]), H @ v, rtol=1e-9, atol=1e-12)
    assert all(a.grad is None for a in net.arch_parameters())  # nothing accumulated


def test_negative_dominant_eigenvalue_keeps_its_sign():
    a = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    diag = torch.tensor([-3.0, 1.0, 2.0], dtype=torch.float64)

    def loss():
        return 0.5 * (diag * a * a).sum() + 0.25 * (b * b).sum() + (a.sum() * b).sum() * 0.0

    ev, vec = dominant_eigenvalue(loss, [a, b], iters=500, tol=1e-12)
    assert ev == pytest.approx(-3.0, rel=1e-8)
    assert abs(vec[0].item()) == pytest.approx(1.0, rel=1e-6)


def test_power_iteration_is_deterministic_and_leaves_the_global_rng_alone():
    net, x, y = _tiny_net(seed=4)
    state = torch.get_rng_state()
    with pynas.use_backend("reference"):
        a = dominant_eigenvalue(lambda: net._loss(x, y), net.arch_parameters(), iters=5, seed=7)
        b = dominant_eigenvalue(lambda: net._loss(x, y), net.arch_parameters(), iters=5, seed=7)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_arguments():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="iters"):
        dominant_eigenvalue(lambda: (p * p).sum(), [p], iters=0)
    with pytest.raises(ValueError, match="params"):
        dominant_eigenvalue(lambda: (p * p).sum(), [torch.zeros(2)])
    with pytest.raises(ValueError, match="vec"):
        hessian_vector_product(lambda: (p * p).sum(), [p], torch.zeros(3))
    with pytest.raises(ValueError, match="loss_fn"):
        hessian_vector_product(lambda: p * p, [p], torch.zeros(2))
    for kw, name in [({"window": 0}, "window"), ({"k": 1.5}, "k"), ({"threshold": float("nan")}, "threshold")]:
        with pytest.raises(ValueError, match=name):
            EigenvalueEarlyStop(**kw)


def test_cpu_backend_eigenvalue_matches_the_reference():
    if pynas.backends().get("cpu") is not None:
        pytest.skip(f"cpu backend: {pynas.backends()['cpu']}")
    net, x, y = _tiny_net(seed=1)
    net.train()
    with pynas.use_backend("reference"):
        ref, _ = dominant_eigenvalue(lambda: net._loss(x, y), net.arch_parameters(), iters=300, tol=1e-12)
    with pynas.use_backend("cpu"):
        got, _ = dominant_eigenvalue(lambda: net._loss(x, y), net.arch_parameters(), iters=300, tol=1e-12)
    assert got == pytest.approx(ref, rel=1e-6)


# -- the DARTS-ES rule --------------------------------------------------------------------------------------------
def test_early_stop_rule_on_a_synthetic_sequence():
    rule = EigenvalueEarlyStop(window=2, k=2, threshold=0.75)
    flat = [1.0, 1.0, 1.0, 1.0, 1.1, 1.2]  # grows, but by less than 1 / 0.75 within 2 epochs
    assert [rule.update(v) for v in flat] == [False] * 6
    assert rule.stop_epoch is None and rule.local_mean(6) == pytest.approx(1.15)
    # epoch 7: mean_2(7) = (1.2 + 2.0) / 2 = 1.6; mean_2(5) = (1.0 + 1.1) / 2 = 1.05; 1.05 / 1.6 < 0.75
    assert rule.update(2.0)
    assert rule.stop_epoch == 7 and rule.rollback_epoch == 5
    assert rule.update(0.0)  # stays stopped
    assert rule.values == flat + [2.0]


def test_early_stop_needs_full_windows_and_a_positive_mean():
    rule = EigenvalueEarlyStop(window=5, k=5, threshold=0.75)
    values = [0.1 * 2 ** i for i in range(9)]  # grows fast, but epoch 10 is the first that can stop
    assert not any(rule.update(v) for v in values)
    assert rule.update(0.1 * 2 ** 9) and rule.stop_epoch == 10 and rule.rollback_epoch == 5
    neg = EigenvalueEarlyStop(window=1, k=1, threshold=0.75)
    assert not any(neg.update(v) for v in [-1.0, -5.0, -0.1, float("nan"), 1.0])
    assert neg.update(2.0) and neg.stop_epoch == 6  # 1.0 / 2.0 < 0.75


def test_early_stop_replay_equals_feeding():
    seq = [1.0, 0.9, 1.1, 1.0, 1.3, 1.8, 2.5, 3.0]
    fed = EigenvalueEarlyStop(window=2, k=3, threshold=0.75)
    stops = [fed.update(v) for v in seq]
    again = EigenvalueEarlyStop.replay(seq[:5], window=2, k=3, threshold=0.75)
    assert [again.update(v) for v in seq[5:]] == stops[5:]
    assert again.stop_epoch == fed.stop_epoch is not None


# -- --track-hessian in the searches -------------------------------------------------------------------------------
def _alphas(result_dir):
    return load_checkpoint(str(result_dir))["alphas"]


def test_cnn_search_tracks_the_eigenvalue_without_changing_the_run(tmp_path):
    lines = []
    plain = run_search(CNNSearchConfig(epochs=2, **TINY), save_dir=str(tmp_path / "a"), log=_quiet, progress=False)
    tracked = run_search(CNNSearchConfig(epochs=2, track_hessian=True, hessian_iters=5, **TINY),
                         save_dir=str(tmp_path / "b"), log=lines.append, progress=False)
    for rec in tracked["history"]:
        assert math.isfinite(rec["hessian_eigenvalue"]) and rec["hessian_eigenvalue"] != 0.0
    assert all("hessian_eigenvalue" in line for line in lines if line.startswith("epoch "))
    for a, b in zip(_alphas(tmp_path / "a"), _alphas(tmp_path / "b")):
        assert torch.equal(a, b)
    ca, cb = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    for k, v in ca["model"].items():  # BatchNorm running statistics included
        assert torch.equal(v, cb["model"][k]), k
    assert torch.equal(ca["torch_rng"], cb["torch_rng"])
    assert [r["train_loss"] for r in plain["history"]] == [r["train_loss"] for r in tracked["history"]]
    assert [r["hessian_eigenvalue"] for r in cb["history"]] == [r["hessian_eigenvalue"] for r in tracked["history"]]


def test_rnn_search_tracks_the_eigenvalue_without_changing_the_run(tmp_path):
    from pynas.search.rnn import RNNSearchConfig, run_rnn_search

    small = dict(max_tokens=20000, emsize=4, nhid=4, nhidlast=4, batch_size=4, bptt=3, epochs=2, steps_per_epoch=1,
                 eval_batch_size=2)
    plain = run_rnn_search(RNNSearchConfig(**small), save_dir=str(tmp_path / "a"), log=_quiet, progress=False)
    tracked = run_rnn_search(RNNSearchConfig(track_hessian=True, hessian_iters=5, **small),
                             save_dir=str(tmp_path / "b"), log=_quiet, progress=False)
    assert all(math.isfinite(r["hessian_eigenvalue"]) for r in tracked["history"])
    for a, b in zip(_alphas(tmp_path / "a"), _alphas(tmp_path / "b")):
        assert torch.equal(a, b)
    ca, cb = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert torch.equal(ca["torch_rng"], cb["torch_rng"])
    assert [r["val_loss"] for r in plain["history"]] == [r["val_loss"] for r in tracked["history"]]


def _scripted(monkeypatch, values):
    """Make the eigenvalues of a run follow ``values`` (the plumbing of the early stop, not the math)."""
    it = iter(values)
    monkeypatch.setattr(CNNSearch, "hessian_eigenvalue", lambda self: next(it))


def test_early_stop_in_a_search_keeps_the_genotype_of_epoch_i_minus_k(tmp_path, monkeypatch):
    _scripted(monkeypatch, [1.0, 1.0, 1.0, 3.0, 9.0, 9.0])
    cfg = CNNSearchConfig(epochs=6, track_hessian=True, hessian_stop=True, hessian_window=1, hessian_k=2, **TINY)
    lines = []
    out = run_search(cfg, save_dir=str(tmp_path), log=lines.append, progress=False)
    # epoch 4: mean_1(2) / mean_1(4) = 1 / 3 < 0.75 -> stop, keep epoch 2
    assert len(out["history"]) == 4
    stop = out["history"][-1]["early_stop"]
    assert stop["epoch"] == 4 and stop["genotype_epoch"] == 2
    assert out["early_stop"] == stop
    assert json.dumps(out["genotype"]) == out["history"][1]["genotype"] == stop["genotype"]
    assert json.load(open(tmp_path / "genotype.json")) == out["genotype"]
    assert any(line.startswith("early stop (DARTS-ES) after epoch 4") for line in lines)
    # resuming a stopped run runs nothing more and gives the same genotype
    again = run_search(cfg, save_dir=str(tmp_path), resume=str(tmp_path), log=_quiet, progress=False)
    assert len(again["history"]) == 4 and again["genotype"] == out["genotype"]


def test_early_stop_state_survives_a_resume(tmp_path, monkeypatch):
    cfg = CNNSearchConfig(epochs=6, track_hessian=True, hessian_stop=True, hessian_window=2, hessian_k=1, **TINY)
    values = [1.0, 1.0, 1.0, 1.2, 5.0, 5.0]
    _scripted(monkeypatch, values)
    straight = run_search(cfg, save_dir=str(tmp_path / "a"), log=_quiet, progress=False)
    _scripted(monkeypatch, values)
    first = CNNSearch(cfg, save_dir=str(tmp_path / "b"), log=_quiet, progress=False)
    first.run(until=3)
    _scripted(monkeypatch, values[3:])
    resumed = run_search(cfg, save_dir=str(tmp_path / "b"), resume=str(tmp_path / "b"), log=_quiet, progress=False)
    assert straight["early_stop"] == resumed["early_stop"]
    assert straight["early_stop"]["epoch"] == 5  # 1.0 / 1.1 >= 0.75 at epoch 4; 1.1 / 3.1 < 0.75 at 5
    assert [r["hessian_eigenvalue"] for r in resumed["history"]] == values[:5]


def test_cli_track_hessian_and_its_errors(tmp_path, capsys):
    argv = ["search", "cnn", "--num-train", "8", "--batch-size", "4", "--init-channels", "2", "--layers", "1",
            "--steps-per-epoch", "1", "--no-progress", "--epochs", "1"]
    assert main(argv + ["--save", str(tmp_path / "run"), "--track-hessian", "--hessian-iters", "3"]) == 0
    out = capsys.readouterr().out
    assert "hessian_eigenvalue" in out
    assert "hessian_eigenvalue" in (tmp_path / "run" / "log.txt").read_text()
    rec = load_checkpoint(str(tmp_path / "run"))["history"][0]
    assert math.isfinite(rec["hessian_eigenvalue"])
    for extra, name in [(["--hessian-stop"], "hessian_stop"), (["--track-hessian", "--hessian-iters", "0"],
                                                                 "hessian_iters"),
                        (["--track-hessian", "--hessian-threshold", "nan"], "hessian_threshold")]:
        assert main(argv + ["--save", str(tmp_path / "bad")] + extra) == 2
        assert capsys.readouterr().err.startswith(f"pynas: error: {name}: ")
        assert not (tmp_path / "bad").exists()
