"""The command line's errors: one clear line naming the flag or path, no traceback; Ctrl-C exits 130 and keeps the
last checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from pynas.cli import main
from pynas.search import CNNSearch, CNNSearchConfig, load_checkpoint

TINY = ["--num-train", "8", "--batch-size", "4", "--init-channels", "2", "--layers", "1", "--steps-per-epoch", "1",
        "--no-progress"]
RNN_TINY = ["--max-tokens", "2000", "--emsize", "4", "--nhid", "4", "--batch-size", "2", "--bptt", "3",
            "--steps-per-epoch", "1", "--eval-batch-size", "2", "--no-progress"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pynas", *args], capture_output=True, text=True, timeout=300)


def _driver(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _one_line(stderr):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- 3. OSError and Ctrl-C ------------------------------------------------------------------------------------------
def test_save_under_a_regular_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("search", "cnn", "--epochs", "1", "--save", str(blocker / "run"), *TINY)
    assert res.returncode == 1, res.stderr
    line = _one_line(res.stderr)
    assert line.startswith("pynas: error: ") and str(blocker) in line


def test_save_in_an_unwritable_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        res = _cli("search", "cnn", "--epochs", "1", "--save", str(ro / "run"), *TINY)
    finally:
        ro.chmod(0o700)
    assert res.returncode == 1, res.stderr
    assert str(ro) in _one_line(res.stderr)


def test_bench_out_under_a_regular_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("bench", "--size", "tiny", "--benchmarks", "mixed_sum_fwd", "--providers", "reference", "--repeats",
               "1", "--warmup", "0", "--no-progress", "--out", str(blocker / "rows.jsonl"))
    assert res.returncode == 1, res.stderr
    line = _one_line(res.stderr)
    assert line.startswith("pynas: error: ") and str(blocker) in line


def test_disk_full_while_writing_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    res = _driver(
        "import errno, os, sys\n"
        "def full(fd):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "os.fsync = full\n"
        "from pynas.cli import main\n"
        f"sys.exit(main(['search', 'cnn', '--epochs', '1', '--save', {str(run)!r}] + {TINY!r}))\n")
    assert res.returncode == 1, res.stderr
    line = _one_line(res.stderr)
    assert line.startswith("pynas: error: ") and "No space left on device" in line
    assert os.path.join(str(run), "checkpoint.pt") in line
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")] if run.exists() else True


def test_ctrl_c_exits_130_and_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    res = _driver(
        "import sys, pynas.search as s\n"
        "real = s.CNNSearch.train_epoch\n"
        "def train_epoch(self, epoch):\n"
        "    if epoch == 1:\n"
        "        raise KeyboardInterrupt\n"
        "    return real(self, epoch)\n"
        "s.CNNSearch.train_epoch = train_epoch\n"
        "from pynas.cli import main\n"
        f"sys.exit(main(['search', 'cnn', '--epochs', '2', '--save', {str(run)!r}] + {TINY!r}))\n")
    assert res.returncode == 130, res.stderr
    assert _one_line(res.stderr).startswith("pynas: interrupted")
    ckpt = load_checkpoint(str(run))
    assert ckpt["epoch"] == 1
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]


def test_ctrl_c_while_saving_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    res = _driver(
        "import sys, pynas.search.loop as s\n"
        "real = s.atomic_save\n"
        "calls = []\n"
        "def save(obj, path):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 2:\n"
        "        import torch\n"
        "        real_save = torch.save\n"
        "        def interrupted(*a, **k):\n"
        "            raise KeyboardInterrupt\n"
        "        torch.save = interrupted\n"
        "        try:\n"
        "            return real(obj, path)\n"
        "        finally:\n"
        "            torch.save = real_save\n"
        "    return real(obj, path)\n"
        "s.atomic_save = save\n"
        "from pynas.cli import main\n"
        f"sys.exit(main(['search', 'cnn', '--epochs', '2', '--save', {str(run)!r}] + {TINY!r}))\n")
    assert res.returncode == 130, res.stderr
    assert load_checkpoint(str(run))["epoch"] == 1
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]


# -- 4. meaningless settings ------------------------------------------------------------------------------------------
CNN_BAD = [
    (["--grad-clip", "-1"], "grad_clip"),
    (["--grad-clip", "0"], "grad_clip"),
    (["--grad-clip", "inf"], "grad_clip"),
    (["--lr", "inf"], "learning_rate"),
    (["--lr", "nan"], "learning_rate"),
    (["--lr-min", "-0.001"], "learning_rate_min"),
    (["--lr-min", "0.5"], "learning_rate_min"),
    (["--lr-min", "nan"], "learning_rate_min"),
    (["--momentum", "nan"], "momentum"),
    (["--momentum", "1"], "momentum"),
    (["--momentum", "-0.1"], "momentum"),
    (["--weight-decay=-1e-4"], "weight_decay"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--arch-weight-decay", "-1"], "arch_weight_decay"),
    (["--arch-lr", "nan"], "arch_learning_rate"),
    (["--arch-lr", "inf"], "arch_learning_rate"),
    (["--fd-r", "inf"], "fd_r"),
    (["--fd-r", "nan"], "fd_r"),
    (["--train-portion", "nan"], "train_portion"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2 ** 64)], "seed"),
]

RNN_BAD = [
    (["--clip", "-1"], "clip"),
    (["--clip", "inf"], "clip"),
    (["--lr", "inf"], "lr"),
    (["--wdecay=-1e-7"], "wdecay"),
    (["--wdecay", "inf"], "wdecay"),
    (["--arch-wdecay", "-1"], "arch_wdecay"),
    (["--arch-lr", "nan"], "arch_lr"),
    (["--dropout", "nan"], "dropout"),
    (["--dropoute", "1"], "dropoute"),
    (["--dropouti", "-0.1"], "dropouti"),
    (["--alpha", "inf"], "alpha"),
    (["--beta", "nan"], "beta"),
    (["--fd-r", "nan"], "fd_r"),
    (["--seed", "-5"], "seed"),
    (["--seed", str(2 ** 63)], "seed"),
]


@pytest.mark.parametrize("argv, name", CNN_BAD, ids=[" ".join(a) for a, _ in CNN_BAD])
def test_cnn_meaningless_values_are_refused(tmp_path, capsys, argv, name):
    run = tmp_path / "run"
    rc = main(["search", "cnn", "--epochs", "1", "--save", str(run)] + TINY + argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert _one_line(err).startswith(f"pynas: error: {name}: "), err
    assert not run.exists()


@pytest.mark.parametrize("argv, name", RNN_BAD, ids=[" ".join(a) for a, _ in RNN_BAD])
def test_rnn_meaningless_values_are_refused(tmp_path, capsys, argv, name):
    run = tmp_path / "run"
    rc = main(["search", "rnn", "--epochs", "1", "--save", str(run)] + RNN_TINY + argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert _one_line(err).startswith(f"pynas: error: {name}: "), err
    assert not run.exists()


def test_api_refuses_the_same_values():
    for kw, name in [({"grad_clip": -1.0}, "grad_clip"), ({"momentum": float("nan")}, "momentum"),
                     ({"learning_rate": float("inf")}, "learning_rate"), ({"seed": -1}, "seed"),
                     ({"weight_decay": -1.0}, "weight_decay"), ({"unrolled": "yes"}, "unrolled")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            CNNSearch(CNNSearchConfig(**kw))
    from pynas.search.rnn import RNNSearch, RNNSearchConfig

    for kw, name in [({"clip": 0.0}, "clip"), ({"wdecay": float("inf")}, "wdecay"), ({"seed": 2 ** 70}, "seed")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            RNNSearch(RNNSearchConfig(**kw))


def test_good_values_still_run(tmp_path):
    # the edges of the ranges: momentum 0, no weight decay, lr_min == lr, the largest seed
    rc = main(["search", "cnn", "--epochs", "1", "--save", str(tmp_path / "run"), "--momentum", "0",
               "--weight-decay", "0", "--lr-min", "0.025", "--seed", str(2 ** 32 - 1)] + TINY)
    assert rc == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]["seed"] == 2 ** 32 - 1
