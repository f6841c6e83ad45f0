"""The RNN search loop and `pynas search rnn`: runs, logs perplexity, checkpoints, resumes exactly."""
import json
import math
import re

import pytest
import torch

from pynas.cli import main
from pynas.search.rnn import RNNSearch, RNNSearchConfig, run_rnn_search

SMALL = dict(max_tokens=20000, emsize=8, nhid=8, nhidlast=8, batch_size=4, bptt=6, epochs=2, steps_per_epoch=4,
             eval_batch_size=4)


def _cfg(**kw):
    d = dict(SMALL)
    d.update(kw)
    return RNNSearchConfig(**d)


def _state(search):
    return ([p.detach().clone() for p in search.model.parameters()],
            [a.detach().clone() for a in search.model.arch_parameters()],
            [b.clone() for b in search.model.buffers()])


@pytest.mark.parametrize("unrolled", [False, True])
def test_search_runs_and_logs_perplexity(tmp_path, unrolled):
    lines = []
    out = run_rnn_search(_cfg(unrolled=unrolled), save_dir=str(tmp_path), log=lines.append, progress=False)
    assert len(out["history"]) == 2
    for rec in out["history"]:
        assert math.isfinite(rec["val_ppl"]) and rec["val_ppl"] > 1
        assert abs(rec["val_ppl"] - math.exp(rec["val_loss"])) < 1e-6 * rec["val_ppl"]
        assert rec["steps"] == 4
    assert all("val_ppl" in line for line in lines)
    genes = json.load(open(tmp_path / "genotype.json"))
    assert len(genes["recurrent"]) == 8 and genes["concat"] == list(range(1, 9))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["space"] == "rnn" and ckpt["epoch"] == 2
    assert "rnns.0._W0" in ckpt["model"] and ckpt["alphas"][0].shape == (36, 5)


def test_resume_continues_exactly(tmp_path):
    full = RNNSearch(_cfg(), save_dir=None, log=lambda s: None, progress=False)
    full.run()
    a = RNNSearch(_cfg(), save_dir=str(tmp_path), log=lambda s: None, progress=False)
    a.run(until=1)
    out = run_rnn_search(_cfg(), save_dir=str(tmp_path), resume=str(tmp_path), log=lambda s: None, progress=False)
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert resumed["epoch"] == 2
    assert out["history"][-1]["val_loss"] == full.history[-1]["val_loss"]
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed["model"][k], v), k
    assert torch.equal(resumed["alphas"][0], full.model.weights.detach())


def test_the_halves_and_the_lr_scaling(monkeypatch):
    s = RNNSearch(_cfg(epochs=1, steps_per_epoch=30), log=lambda m: None, progress=False)
    n = s.corpus.train.numel() // 2
    assert torch.equal(s.train_data.t().reshape(-1), s.corpus.train[:n][:s.train_data.numel()])
    assert torch.equal(s.search_data.t().reshape(-1), s.corpus.train[n:][:s.search_data.numel()])
    seen = []
    real = s.architect.step

    def spy(hidden, data, targets, hv, dv, tv, optimizer, unrolled):
        seen.append((data.size(0), optimizer.param_groups[0]["lr"], dv.size(0)))
        return real(hidden, data, targets, hv, dv, tv, optimizer, unrolled)

    monkeypatch.setattr(s.architect, "step", spy)
    s.run()
    assert {t for t, _, _ in seen} <= {6, 3}
    for t, lr, tv in seen:
        assert lr == pytest.approx(s.cfg.lr * t / s.cfg.bptt)  # lr scaled by seq_len / bptt
        assert tv == 6  # the search batch always has bptt steps
    assert s.optimizer.param_groups[0]["lr"] == s.cfg.lr  # restored after each step


def test_cli_search_rnn(tmp_path, capsys):
    rc = main(["search", "rnn", "--max-tokens", "20000", "--emsize", "8", "--nhid", "8", "--batch-size", "4",
               "--bptt", "6", "--epochs", "1", "--steps-per-epoch", "3", "--eval-batch-size", "4", "--save",
               str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "val_ppl" in out and "genotype:" in out
    assert (tmp_path / "run" / "log.txt").exists() and (tmp_path / "run" / "genotype.json").exists()


def test_cli_ptb(tmp_path, capsys):
    words = "the cat sat on the mat and the dog ate the bone while it rained".split()
    g = torch.Generator().manual_seed(0)
    for name, n in (("ptb.train.txt", 400), ("ptb.valid.txt", 60), ("ptb.test.txt", 60)):
        idx = torch.randint(0, len(words), (n, 8), generator=g).tolist()
        (tmp_path / name).write_text("\n".join(" ".join(words[i] for i in row) for row in idx) + "\n")
    rc = main(["search", "rnn", "--data", "ptb", "--data-dir", str(tmp_path), "--emsize", "8", "--nhid", "8",
               "--batch-size", "4", "--bptt", "6", "--epochs", "1", "--steps-per-epoch", "3", "--eval-batch-size",
               "4", "--save", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    assert "val_ppl" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--emsize", "8", "--nhid", "16"], "emsize, nhid, nhidlast"),
    (["--data", "ptb"], "data_dir: --data ptb needs --data-dir"),
    (["--data", "ptb", "--data-dir", "/nonexistent-dir"], "--data-dir"),
    (["--batch-size", "1"], "batch_size"),
    (["--dropoutx", "1.5"], "dropoutx"),
    (["--threads", "0"], "--threads"),
    (["--max-tokens", "0"], "max_tokens: expected a positive integer"),
    (["--data", "ptb", "--data-dir", "/tmp", "--max-tokens", "100"], "max_tokens: only the stdlib corpus"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, message):
    rc = main(["search", "rnn", "--save", str(tmp_path / "run"), "--no-progress"] + argv)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_resume_rejects_a_cnn_checkpoint(tmp_path):
    torch.save({"format": "pynas-search", "version": 1, "space": "cnn", "config": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="holds a 'cnn' search"):
        run_rnn_search(_cfg(), resume=str(tmp_path), progress=False)


@pytest.mark.parametrize("argv, minimum", [
    (["--max-tokens", "10", "--batch-size", "4", "--eval-batch-size", "4"], 1000),
    (["--max-tokens", "1000"], None),  # the default batch sizes need more than 2068 tokens
    (["--max-tokens", "1000", "--batch-size", "200"], None),
    (["--max-tokens", "1500", "--batch-size", "4", "--eval-batch-size", "100"], None),
])
def test_cli_max_tokens_too_small_names_the_cap(tmp_path, capsys, argv, minimum):
    run = tmp_path / "run"
    rc = main(["search", "rnn", "--save", str(run), "--no-progress", "--epochs", "1"] + argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("pynas: error: max_tokens: "), err
    assert re.search(r"at least \d+|use --max-tokens \d+ or more", err), err  # says what is enough
    if minimum is not None:
        assert str(minimum) in err
    assert not run.exists()


def test_resume_refuses_tampered_rnn_checkpoints(tmp_path):
    run = tmp_path / "run"
    RNNSearch(_cfg(epochs=2, steps_per_epoch=1), save_dir=str(run), log=lambda s: None, progress=False).run(until=1)
    path = run / "checkpoint.pt"
    genuine = torch.load(path, weights_only=True)

    def resume_with(ckpt):
        torch.save(ckpt, path)
        return run_rnn_search(_cfg(epochs=2, steps_per_epoch=1), save_dir=str(run), resume=str(run),
                              log=lambda s: None, progress=False)

    flipped = dict(genuine, model=dict(genuine["model"]))
    flipped["model"]["rnns.0._W0"] = genuine["model"]["rnns.0._W0"].clone()
    flipped["model"]["rnns.0._W0"][0, 0] += 1
    with pytest.raises(ValueError, match="checksum mismatch"):
        resume_with(flipped)

    from pynas.search import checkpoint_checksum

    extra = dict(genuine, alphas=genuine["alphas"] * 2)
    extra["checksum"] = checkpoint_checksum(extra)
    with pytest.raises(ValueError, match=r"2 alpha tensor\(s\), this search has 1"):
        resume_with(extra)

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    evil = dict(genuine, history=genuine["history"] + [Payload()])
    with pytest.raises(ValueError, match="resume: .*refused"):
        resume_with(evil)
    assert not marker.exists()
    out = resume_with(genuine)  # the genuine one still resumes
    assert len(out["history"]) == 2


def test_cli_search_rnn_track_hessian(tmp_path, capsys):
    rc = main(["search", "rnn", "--max-tokens", "20000", "--emsize", "4", "--nhid", "4", "--batch-size", "4",
               "--bptt", "3", "--epochs", "1", "--steps-per-epoch", "1", "--eval-batch-size", "2", "--save",
               str(tmp_path / "run"), "--no-progress", "--track-hessian", "--hessian-iters", "2"])
    assert rc == 0
    assert "hessian_eigenvalue" in capsys.readouterr().out
    rec = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["history"][0]
    assert math.isfinite(rec["hessian_eigenvalue"])
