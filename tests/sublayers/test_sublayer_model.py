"""The sublayer-order space (sandwich transformer): the model against a plain reference written here from the
semantics (pynas/sublayers/model.py's docstring), parameter counts, the order families, and resumable trials."""
from __future__ import annotations

import itertools
import math
import os
import random

import pytest
import torch

from pynas.sublayers import (SublayerLM, SublayerTrialConfig, check_order, count_parameters, interleaved,
                             random_balanced, random_same_params, sandwich, sublayer_weights, train_order)
from pynas.sublayers import trial as st

EPS = 1e-5  # nn.LayerNorm's default


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def reference_logits(P, order, tokens, heads):
    """The semantics, spelled out: embeddings, post-norm sublayers in order, the tied output with its bias."""
    B, T = tokens.shape
    E = P["embed.weight"]
    d = E.shape[1]
    dh = d // heads
    h = E[tokens] + P["pos.weight"][:T]
    mask = torch.triu(torch.full((T, T), float("-inf"), dtype=E.dtype), diagonal=1)  # -inf where j > i
    for i, c in enumerate(order):
        def lin(x, name):
            return x @ P[f"layers.{i}.{name}.weight"].t() + P[f"layers.{i}.{name}.bias"]
        if c == "s":
            q, k, v = (lin(h, n).reshape(B, T, heads, dh).permute(0, 2, 1, 3) for n in ("q", "k", "v"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(dh) + mask
            a = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).reshape(B, T, d)
            y = lin(a, "out")
        else:
            y = lin(torch.relu(lin(h, "fc1")), "fc2")
        h = layer_norm(h + y, P[f"layers.{i}.norm.weight"], P[f"layers.{i}.norm.bias"])
    return h @ E.t() + P["out_bias"]


class Recording(dict):
    """A dict that remembers which keys were read (so the reference is seen to use every parameter)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


# ------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("order", ["sfsf", "ssff", "fs"])
def test_model_matches_reference_logits_and_gradients(order):
    torch.manual_seed(0)
    V, d, H, T = 37, 16, 2, 9
    model = SublayerLM(V, order, d_model=d, heads=H, dropout=0.0, max_len=12).double()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and biases
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, V, (3, T))
    P = Recording(model.named_parameters())
    names = list(P)
    params = [P[n] for n in names]
    P.read.clear()
    w = torch.randn(3, T, V, dtype=torch.float64)

    got = model(tokens)
    want = reference_logits(P, order, tokens, H)
    assert P.read == set(names)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g_got = torch.autograd.grad((got * w).sum(), params)
    g_want = torch.autograd.grad((want * w).sum(), params)
    for name, a, b in zip(names, g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
        assert a.abs().sum() > 0, name


def test_model_is_causal_and_dropout_only_in_training():
    torch.manual_seed(1)
    model = SublayerLM(20, "sfs", d_model=8, heads=2, dropout=0.3, max_len=8)
    model.eval()
    x = torch.randint(0, 20, (2, 8))
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 20
    with torch.no_grad():
        a, b = model(x), model(y)
        torch.testing.assert_close(a[:, :5], b[:, :5])
        assert not torch.allclose(a[:, 5:], b[:, 5:])
        torch.testing.assert_close(model(x), a)  # eval: deterministic
        model.train()
        assert not torch.allclose(model(x), a)


def test_model_refuses_bad_inputs():
    model = SublayerLM(20, "sf", d_model=8, heads=2, max_len=6)
    with pytest.raises(ValueError, match="^tokens: "):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="^tokens: "):
        model(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="^tokens: "):
        model(torch.zeros(1, 6))
    assert model(torch.zeros(2, 6, dtype=torch.long)).shape == (2, 6, 20)
    with pytest.raises(ValueError, match="^heads: "):
        SublayerLM(20, "sf", d_model=8, heads=3)
    with pytest.raises(ValueError, match="^dropout: "):
        SublayerLM(20, "sf", d_model=8, heads=2, dropout=1.0)
    with pytest.raises(ValueError, match="^order: "):
        SublayerLM(20, "sfx", d_model=8, heads=2)


# ------------------------------------------------------------------------------------- parameter counts


def test_balanced_orders_have_one_parameter_count():
    n, d, V = 3, 8, 30
    counts = {order: count_parameters(SublayerLM(V, order, d_model=d, heads=2))
              for order in {"".join(p) for p in itertools.permutations("sssfff")}}
    assert len(counts) == math.comb(2 * n, n)
    assert len(set(counts.values())) == 1
    # embeddings + output bias + per sublayer: s = 4d^2 + 4d (biases) + 2d (LayerNorm), f = 8d^2 + 5d + 2d
    assert set(counts.values()) == {V * d + 64 * d + V + n * (4 * d * d + 6 * d) + n * (8 * d * d + 7 * d)}


def test_sublayer_weights_and_weight_matrices():
    assert sublayer_weights("s", 8) == 4 * 64
    assert sublayer_weights("f", 8) == 8 * 64
    assert sublayer_weights("ssf", 8) == sublayer_weights("ff", 8) == 16 * 64
    assert sublayer_weights(interleaved(4), 16) == 12 * 4 * 16 ** 2
    d = 12
    for order in ("s", "f", "sf", "ssfsf"):
        model = SublayerLM(10, order, d_model=d, heads=3)
        matrices = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
        assert matrices == sublayer_weights(order, d)
    s, f = (SublayerLM(10, c, d_model=d, heads=3).layers[0] for c in "sf")
    ws, wf = (sum(p.numel() for p in m.parameters() if p.dim() == 2) for m in (s, f))
    assert wf == 2 * ws == 8 * d * d
    with pytest.raises(ValueError, match="^d: "):
        sublayer_weights("sf", 0)


# ------------------------------------------------------------------------------------------- families


def test_families():
    for n in (1, 2, 5):
        assert sandwich(n, 0) == interleaved(n) == "sf" * n
        for k in range(n + 1):
            s = sandwich(n, k)
            assert s.count("s") == s.count("f") == n and len(s) == 2 * n
            assert s.startswith("s" * k) and s.endswith("f" * k)
    assert sandwich(4, 2) == "sssfsfff"
    assert sandwich(3, 3) == "sssfff"
    rng = random.Random(5)
    for n in (1, 3, 6):
        for _ in range(20):
            b = random_balanced(rng, n)
            assert b.count("s") == b.count("f") == n and check_order(b) == b
            p = random_same_params(rng, n)
            assert check_order(p) == p
            assert p.count("s") + 2 * p.count("f") == 3 * n
            assert sublayer_weights(p, 8) == sublayer_weights(interleaved(n), 8)
    a, b = random.Random(11), random.Random(11)
    assert [random_balanced(a, 4) for _ in range(5)] == [random_balanced(b, 4) for _ in range(5)]
    assert [random_same_params(a, 4) for _ in range(5)] == [random_same_params(b, 4) for _ in range(5)]


def test_random_families_cover_their_range():
    rng = random.Random(0)
    assert len({random_balanced(rng, 2) for _ in range(300)}) == math.comb(4, 2)
    n_f = {random_same_params(rng, 3).count("f") for _ in range(300)}
    assert n_f == set(range(0, 3 * 3 // 2 + 1))


@pytest.mark.parametrize("call, name", [
    (lambda: sandwich(3, 4), "k"), (lambda: sandwich(3, -1), "k"), (lambda: sandwich(3, 1.0), "k"),
    (lambda: sandwich(0, 0), "n"), (lambda: interleaved(0), "n"), (lambda: interleaved(True), "n"),
    (lambda: random_balanced(random.Random(0), 0), "n"), (lambda: random_same_params(random.Random(0), -2), "n"),
    (lambda: random_balanced(0, 2), "rng"), (lambda: random_same_params(None, 2), "rng"),
    (lambda: check_order(""), "order"), (lambda: check_order("sfa"), "order"), (lambda: check_order(["s"]), "order"),
    (lambda: check_order("SF"), "order"), (lambda: sublayer_weights("x", 4), "order"),
])
def test_families_refuse_bad_arguments(call, name):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        call()


def test_check_order_message():
    with pytest.raises(ValueError) as info:
        check_order("sfz")
    assert str(info.value) == ("order: expected a non-empty string of 's' (self-attention) and 'f' (feed-forward) "
                               "sublayers, got 'sfz'")


# --------------------------------------------------------------------------------------------- trials


def tiny(**kw) -> SublayerTrialConfig:
    base = dict(d_model=16, heads=2, block=16, batch_size=4, eval_batches=2, max_tokens=20000, vocab_size=500,
                total_steps=60, warmup=5)
    base.update(kw)
    return SublayerTrialConfig(**base)


def test_split_run_equals_unsplit_run(tmp_path):
    cfg = tiny()
    rng_state, threads = torch.get_rng_state(), torch.get_num_threads()
    whole = train_order("sfsf", 0, 20, str(tmp_path / "whole.pt"), 3, cfg)
    assert torch.equal(torch.get_rng_state(), rng_state) and torch.get_num_threads() == threads
    first = train_order("sfsf", 0, 8, str(tmp_path / "split.pt"), 3, cfg)
    split = train_order("sfsf", 8, 20, str(tmp_path / "split.pt"), 3, cfg)
    assert first["steps"] == 8 and split["steps"] == whole["steps"] == 20
    assert split["fitness"] == whole["fitness"] and split["valid_loss"] == whole["valid_loss"]
    assert first["fitness"] != whole["fitness"]
    assert whole["fitness"] == -whole["valid_loss"] and whole["perplexity"] == math.exp(whole["valid_loss"])
    assert whole["weights"] == sublayer_weights("sfsf", 16)
    assert whole["params"] == count_parameters(SublayerLM(500, "sfsf", 16, 2, max_len=16))
    assert whole["seconds"] > 0
    a = torch.load(tmp_path / "whole.pt", weights_only=True)
    b = torch.load(tmp_path / "split.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert sorted(os.listdir(tmp_path)) == ["split.pt", "whole.pt"]  # no temporaries left


def test_training_improves_on_the_untrained_model(tmp_path):
    cfg = tiny(lr=3e-3, total_steps=80)
    data = st.corpus(cfg.max_tokens, cfg.vocab_size)
    x, y = st.valid_windows(data.valid, cfg.eval_batches * cfg.batch_size, cfg.block)
    torch.manual_seed(7)
    untrained = st.evaluate(SublayerLM(data.ntokens, "ssff", 16, 2, cfg.dropout, max_len=cfg.block), x, y, 4)
    assert abs(untrained - math.log(data.ntokens)) < 1.0
    out = train_order("ssff", 0, 80, str(tmp_path / "c.pt"), 7, cfg)
    assert out["valid_loss"] < untrained - 0.5
    assert out["fitness"] > -untrained


def test_default_config_fits_the_default_corpus():
    cfg = SublayerTrialConfig()
    cfg.check()
    data = st.corpus(cfg.max_tokens, cfg.vocab_size)
    x, y = st.valid_windows(data.valid, cfg.eval_batches * cfg.batch_size, cfg.block)
    assert x.shape == y.shape == (cfg.eval_batches * cfg.batch_size, cfg.block)
    assert data.train.numel() > 100 * cfg.block and data.ntokens == cfg.vocab_size


def test_batches_and_schedule():
    ids = torch.arange(100)
    x, y = st.train_batch(ids, 1, 5, 10, 6)
    assert x.shape == y.shape == (6, 10)
    assert torch.equal(y, x + 1) and int(x.min()) >= 0 and int(y.max()) <= 99
    assert torch.equal(st.train_batch(ids, 1, 5, 10, 6)[0], x)
    assert not torch.equal(st.train_batch(ids, 1, 6, 10, 6)[0], x)
    vx, vy = st.valid_windows(ids, 3, 9)
    assert torch.equal(vx[:, 0], torch.tensor([0, 10, 20])) and torch.equal(vy, vx + 1)
    with pytest.raises(ValueError, match="^eval_batches: "):
        st.valid_windows(ids, 11, 9)
    assert [st.lr_factor(i, 4, 12) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert st.lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert 0 < st.lr_factor(11, 4, 12) < 0.05


def test_checkpoint_of_another_step_or_run_is_refused(tmp_path):
    cfg = tiny(total_steps=10)
    path = str(tmp_path / "c.pt")
    train_order("sf", 0, 3, path, 0, cfg)
    with pytest.raises(ValueError, match="^checkpoint: expected a checkpoint at step 2, got one at step 3"):
        train_order("sf", 2, 5, path, 0, cfg)
    with pytest.raises(ValueError, match="^checkpoint: expected order 'fs'"):
        train_order("fs", 3, 5, path, 0, cfg)
    with pytest.raises(ValueError, match="^checkpoint: expected order 'sf' with seed 1"):
        train_order("sf", 3, 5, path, 1, cfg)
    with pytest.raises(ValueError, match="^checkpoint: expected the training settings"):
        train_order("sf", 3, 5, path, 0, tiny(total_steps=10, lr=2e-3))
    with pytest.raises(FileNotFoundError, match="^checkpoint: "):
        train_order("sf", 3, 5, str(tmp_path / "missing.pt"), 0, cfg)
    assert train_order("sf", 3, 4, path, 0, tiny(total_steps=10, threads=2))["steps"] == 4


@pytest.mark.parametrize("args, name", [
    (dict(order="sx"), "order"), (dict(order=""), "order"),
    (dict(start=-1), "start"), (dict(start=1.0), "start"),
    (dict(start=2, end=2), "end"), (dict(end=11), "end"), (dict(end=0), "end"),
    (dict(checkpoint=""), "checkpoint"), (dict(checkpoint=None), "checkpoint"),
    (dict(seed=-1), "seed"), (dict(seed="1"), "seed"), (dict(cfg={}), "cfg"),
    (dict(cfg=tiny(heads=3)), "heads"), (dict(cfg=tiny(dropout=1.0)), "dropout"), (dict(cfg=tiny(lr=0.0)), "lr"),
    (dict(cfg=tiny(clip=-1.0)), "clip"), (dict(cfg=tiny(block=0)), "block"), (dict(cfg=tiny(warmup=-1)), "warmup"),
    (dict(cfg=tiny(max_tokens=10)), "max_tokens"), (dict(cfg=tiny(vocab_size=2)), "vocab_size"),
    (dict(cfg=tiny(threads=0)), "threads"), (dict(cfg=tiny(total_steps=0)), "total_steps"),
    (dict(cfg=tiny(eval_batches=1000)), "eval_batches"), (dict(cfg=tiny(lr=float("nan"))), "lr"),
])
def test_train_order_refuses_bad_arguments(tmp_path, args, name):
    call = dict(order="sf", start=0, end=2, checkpoint=str(tmp_path / "c.pt"), seed=0, cfg=tiny(total_steps=10))
    call.update(args)
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        train_order(**call)
    assert not os.path.exists(tmp_path / "c.pt")
