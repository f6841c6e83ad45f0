"""pynas search evolution / sandwich from the command line: the run folder, the final table, resume, bad flags."""
from __future__ import annotations

import json
import os

from pynas.cli import main

SUBLAYER_TINY = ["--d-model", "16", "--heads", "2", "--block", "16"]
CNN_TINY = ["--init-channels", "4", "--layers", "3", "--batch-size", "8", "--num-train", "64", "--num-valid", "32"]


def test_evolution_cli_runs_and_resumes(tmp_path, capsys):
    save = str(tmp_path / "evo")
    args = ["search", "evolution", "--space", "cnn", "--population", "3", "--sample-size", "2", "--cycles", "3",
            "--budgets", "3,3", "--save", save] + CNN_TINY
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trial 1: candidate 0 stage 0 steps 3" in out and "rank  cand" in out and "hurdle 0:" in out
    for name in ("evolution.json", "trials.jsonl", "results.json", "log.txt", "fitness.png"):
        assert os.path.exists(os.path.join(save, name)), name
    with open(os.path.join(save, "results.json")) as fh:
        first = json.load(fh)
    assert main(["search", "evolution", "--resume", save]) == 0
    assert "(0 trained in this run)" in capsys.readouterr().out
    with open(os.path.join(save, "results.json")) as fh:
        assert json.load(fh)["models"] == first["models"]


def test_sandwich_cli_table(tmp_path, capsys):
    save = str(tmp_path / "sw")
    assert main(["search", "sandwich", "--n", "2", "--steps", "4", "--random-orders", "1", "--baseline-seeds", "1",
                 "--families", "interleaved,sandwich", "--save", save] + SUBLAYER_TINY) == 0
    out = capsys.readouterr().out
    assert "interleaved  sfsf" in out and "sandwich     ssff" in out and "best sandwich: ssff" in out


def test_bad_flags_name_themselves(tmp_path, capsys):
    assert main(["search", "evolution", "--budgets", "3,x", "--save", str(tmp_path / "a")]) == 2
    assert "budgets" in capsys.readouterr().err
    assert main(["search", "evolution", "--population", "0", "--save", str(tmp_path / "b")]) == 2
    assert "population" in capsys.readouterr().err
    assert main(["search", "sandwich", "--ks", "1,a", "--save", str(tmp_path / "c")]) == 2
    assert "ks" in capsys.readouterr().err
    assert main(["search", "evolution", "--resume", str(tmp_path / "nothing")]) == 2
    assert "resume" in capsys.readouterr().err


def test_search_enas_is_the_rnn_search_with_method_enas(tmp_path, capsys):
    save = str(tmp_path / "enas")
    assert main(["search", "enas", "--epochs", "1", "--emsize", "8", "--nhid", "8", "--batch-size", "4", "--bptt", "6",
                 "--steps-per-epoch", "3", "--enas-controller-steps", "3", "--enas-derive-samples", "2",
                 "--max-tokens", "20000", "--eval-batch-size", "2", "--save", save, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "method enas" in out and "enas selection: 2 cells" in out and "controller_reward" in out
    with open(os.path.join(save, "genotype.json")) as fh:
        assert len(json.load(fh)["recurrent"]) == 8
