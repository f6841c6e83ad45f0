"""Training a derived RNN (pynas.train.rnn, ``pynas train rnn``, ``pynas eval rnn``): sequence lengths,
NT-ASGD, the best weights, exact resume, clear errors."""
from __future__ import annotations

import math
import random

import pytest
import torch

from pynas.cli import main
from pynas.rnn.data import stdlib_min_tokens
from pynas.train.rnn import RNNTrainConfig, RNNTraining, evaluate_checkpoint, run_training, sequence_length


@pytest.fixture(scope="module")
def tiny():
    return dict(emsize=8, nhid=8, batch_size=4, eval_batch_size=2, bptt=6, steps_per_epoch=3,
                max_tokens=stdlib_min_tokens(16, 4, 2))


def quiet(s):
    pass


def test_sequence_lengths():
    rng = random.Random(0)
    lengths = [sequence_length(rng, 35) for _ in range(20000)]
    assert min(lengths) >= 5
    short = sum(1 for n in lengths if n < 24) / len(lengths)  # bptt / 2 = 17.5, five standard deviations apart
    assert 0.04 < short < 0.06
    assert abs(sum(n for n in lengths if n >= 24) / sum(1 for n in lengths if n >= 24) - 34.5) < 0.2  # int() floors


def test_switches_to_averaged_sgd_and_keeps_the_best(tiny, tmp_path):
    r = run_training(RNNTrainConfig(epochs=8, nonmono=1, **tiny), save_dir=str(tmp_path), progress=False, log=quiet)
    losses = [h["val_loss"] for h in r["history"]]
    kinds = [h["optimizer"] for h in r["history"]]
    # the switch happens after the first epoch whose loss is worse than the best of all but the last nonmono
    first = next((e for e in range(2, len(losses)) if losses[e] > min(losses[:e - 1])), None)
    if first is None:
        assert kinds == ["sgd"] * len(kinds)
    else:
        assert kinds == ["sgd"] * first + ["asgd"] * (len(kinds) - first)
    assert r["best_val_loss"] == min(losses)
    ev = evaluate_checkpoint(str(tmp_path))
    assert ev["test_ppl"] == pytest.approx(r["test_ppl"], rel=1e-9) and ev["epoch"] == 8
    assert math.isfinite(r["test_ppl"])


def test_resume_continues_exactly(tiny, tmp_path):
    cfg = RNNTrainConfig(epochs=4, nonmono=1, **tiny)
    straight = run_training(cfg, progress=False, log=quiet)
    first = RNNTraining(cfg, save_dir=str(tmp_path), progress=False, log=quiet)
    first.run(until=3)
    resumed = run_training(RNNTrainConfig(), save_dir=str(tmp_path), resume=str(tmp_path), progress=False, log=quiet)
    assert [h["optimizer"] for h in straight["history"]] == [h["optimizer"] for h in resumed["history"]]
    for a, b in zip(straight["history"], resumed["history"]):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    assert straight["test_ppl"] == resumed["test_ppl"]


@pytest.mark.parametrize("change,match", [
    (dict(genotype="NOPE"), "genotype: NOPE is neither a file nor one of DARTS_V1"),
    (dict(nhid=6), "emsize, nhid: expected equal sizes"),
    (dict(data="ptb"), "data_dir: --data ptb needs --data-dir"),
    (dict(max_tokens=1000), "max_tokens: the stdlib corpus cut at 1000 tokens has"),
    (dict(dropoute=1.0), "dropoute"),
])
def test_bad_settings_are_named(tiny, change, match):
    kw = dict(tiny)
    if "max_tokens" in change or change.get("data") == "ptb":
        kw.pop("max_tokens")
    with pytest.raises(ValueError, match=match):
        RNNTraining(RNNTrainConfig(**dict(kw, **change)), progress=False)


def test_cli_train_then_eval(tiny, tmp_path, capsys):
    save = str(tmp_path / "run")
    argv = ["train", "rnn", "--emsize", "8", "--nhid", "8", "--batch-size", "4", "--eval-batch-size", "2",
            "--bptt", "6", "--epochs", "1", "--steps-per-epoch", "2", "--max-tokens", str(tiny["max_tokens"]),
            "--save", save, "--no-progress"]
    assert main(argv) == 0
    assert "test perplexity: " in capsys.readouterr().out
    assert main(["eval", "rnn", "--checkpoint", save]) == 0
    assert "test perplexity: " in capsys.readouterr().out
    assert main(["eval", "cnn", "--checkpoint", save]) == 2  # an RNN training is not a CNN one
    assert "holds a 'rnn' training" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "rnn", "--nhid"])
    torch.manual_seed(0)
