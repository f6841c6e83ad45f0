"""``pynas search cnn|rnn --method ...``: each method runs from the command line with the embedded data, writes
its run folder (log, checkpoint, genotype JSON and picture) and prints its genotype."""
from __future__ import annotations

import json

import pytest

from pynas.cli import main

CNN = ["--num-train", "32", "--batch-size", "4", "--init-channels", "4", "--layers", "3", "--epochs", "1",
       "--steps-per-epoch", "2", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("method", ["darts", "idarts", "pcdarts", "gdas", "rsws", "random"])
def test_cnn_methods_run(tmp_path, capsys, method):
    extra = {"pcdarts": ["--partial-channels", "2", "--warmup-epochs", "0"], "rsws": ["--rsws-samples", "3", "--rsws-top", "1",
                                                            "--rsws-eval-batches", "1"],
             "random": ["--samples", "2"]}.get(method, [])
    save = tmp_path / method
    assert main(["search", "cnn", "--method", method, *CNN, *extra, "--save", str(save)]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("genotype: ")][-1]
    genotype = json.loads(line[len("genotype: "):])
    assert json.loads((save / "genotype.json").read_text()) == genotype
    assert len(genotype["normal"]) == 8 and len(genotype["reduce"]) == 8
    if method != "random":
        assert (save / "genotype.svg").exists() and (save / "checkpoint.pt").exists()
        assert f"method {method}" in (save / "log.txt").read_text()


def test_cnn_method_flags_override_the_method_defaults(tmp_path, capsys):
    save = tmp_path / "p"
    assert main(["search", "cnn", "--method", "pcdarts", *CNN, "--partial-channels", "2", "--learning-rate", "0.05",
                 "--epochs", "16", "--steps-per-epoch", "1", "--save", str(save)]) == 0
    import torch

    cfg = torch.load(save / "checkpoint.pt", weights_only=False)["config"]
    assert cfg["method"] == "pcdarts" and cfg["learning_rate"] == 0.05 and cfg["warmup_epochs"] == 15
    assert cfg["batch_size"] == 4 and cfg["partial_channels"] == 2 and cfg["epochs"] == 16


@pytest.mark.parametrize("args, match", [
    (["--method", "pcdarts", "--partial-channels", "2"], "warmup_epochs: 15 warm-up epochs"),  # of 1 epoch
    (["--method", "idarts", "--unrolled", "--nesterov"], "nesterov:"),
    (["--method", "random", "--unrolled"], "does not apply"),
    (["--method", "pcdarts", "--partial-channels", "1", "--warmup-epochs", "0"], "partial_channels: expected at least 2"),
])
def test_method_flag_errors(capsys, args, match):
    assert main(["search", "cnn", *CNN, *args]) != 0
    assert match in capsys.readouterr().err


def test_gdas_nesterov_can_be_switched_off(tmp_path):
    import torch

    save = tmp_path / "g"
    assert main(["search", "cnn", "--method", "gdas", *CNN, "--no-nesterov", "--save", str(save)]) == 0
    assert torch.load(save / "checkpoint.pt", weights_only=False)["config"]["nesterov"] is False


RNN = ["--max-tokens", "20000", "--emsize", "8", "--nhid", "8", "--batch-size", "4", "--eval-batch-size", "2",
       "--bptt", "5", "--epochs", "1", "--steps-per-epoch", "2", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("method", ["idarts", "rsws", "random"])
def test_rnn_methods_run(tmp_path, capsys, method):
    save = tmp_path / method
    extra = {"random": ["--samples", "2", "--candidate-epochs", "1"],
             "rsws": ["--rsws-samples", "3", "--rsws-top", "1", "--rsws-eval-batches", "1"]}.get(method, [])
    assert main(["search", "rnn", "--method", method, *RNN, *extra, "--save", str(save)]) == 0
    out = capsys.readouterr().out
    genotype = json.loads([ln for ln in out.splitlines() if ln.startswith("genotype: ")][-1][len("genotype: "):])
    assert len(genotype["recurrent"]) == 8
    assert json.loads((save / "genotype.json").read_text()) == genotype


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["search", "cnn", "--method", "enas"])
    assert "--method" in capsys.readouterr().err
