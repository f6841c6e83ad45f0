"""Data-parallel searches (pynas/search/distributed.py) on the CPU with gloo and 2 processes under torchrun: with
synchronised BatchNorm, 2 ranks follow one process on the same global batches (float64, first and second order,
CNN and RNN); with per-rank BatchNorm the fused kernels give the ranks what the module path gives them; a
checkpoint written by 2 ranks resumes in 1; a dead rank ends the run instead of hanging; the pieces (shares, the
synchronised BatchNorm, the collectives' errors) on their own."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from pynas.search import distributed

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def _torchrun(args, tmp_path, nproc=2, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp_path))


def _alone(args):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)


def _close(a, b, rtol):
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:
        x, y = a["model"][k], b["model"][k]
        if x.is_floating_point():
            assert torch.allclose(x, y, rtol=rtol, atol=rtol * 1e-3), k
        else:
            assert torch.equal(x, y), k
    for x, y in zip(a["alphas"], b["alphas"]):
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("space, order, method", [
    ("cnn", "first", "darts"), ("cnn", "second", "darts"), ("rnn", "first", "darts"), ("rnn", "second", "darts"),
    ("cnn", "first", "gdas"), ("cnn", "second", "pcdarts"), ("rnn", "second", "ess")])
def test_two_ranks_with_synchronised_batchnorm_follow_one_process(space, order, method, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    m = f"method={method}"
    res = _alone([WORKER, space, order, "reference", "0", str(tmp_path / "one"), m])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun([WORKER, space, order, "reference", "1", str(tmp_path / "two"), m], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    _close(r0, r1, 1e-12)  # the ranks stay identical
    # and equal one process on the concatenated batches, to float64 rounding of sums taken in another order; ESS's
    # second-order step divides by the finite-difference radius more often (seen: 1.9e-9 relative on an AMD EPYC)
    _close(r0, one, 1e-8 if method == "ess" else 1e-9)
    if (space, order, method) == ("cnn", "first", "darts"):  # the control: per-rank BatchNorm statistics do not
        (tmp_path / "own").mkdir()
        res = _torchrun([WORKER, space, order, "reference", "0", str(tmp_path / "own")], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        with pytest.raises(AssertionError):
            _close(torch.load(tmp_path / "own" / "rank0.pt"), one, 1e-6)


@pytest.mark.parametrize("space", ["cnn", "rnn"])
def test_fused_kernels_under_two_ranks_equal_the_module_path(space, tmp_path):
    outs = {}
    for backend in ("reference", "cpu"):
        (tmp_path / backend).mkdir()
        res = _torchrun([WORKER, space, "second", backend, "0", str(tmp_path / backend)], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[backend] = torch.load(tmp_path / backend / "rank0.pt")
    assert outs["cpu"]["backend"] == "cpu"
    _close(outs["cpu"], outs["reference"], 1e-9)


def test_a_dead_rank_ends_the_run(tmp_path):
    t = time.time()
    res = _torchrun([WORKER, "cnn", "first", "reference", "0", str(tmp_path), "die"], tmp_path, timeout=120)
    assert res.returncode != 0 and time.time() - t < 100
    assert not (tmp_path / "rank0.pt").exists()


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_in_another_world_size(first, then, tmp_path):
    """Epoch 1 on ``first`` processes, epoch 2 resumed on ``then`` (synchronised BatchNorm): the end state of one
    process running both epochs, to float32 rounding."""
    from pynas.search.checkpoint import load_checkpoint
    from pynas.search.cnn import CNNSearch, CNNSearchConfig

    import _dist_worker as w

    run = str(tmp_path / "run")
    res = (_torchrun([WORKER, "ckpt", run], tmp_path) if first == 2 else _alone([WORKER, "ckpt", run]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_checkpoint(run)["epoch"] == 1
    resume = ["-m", "pynas", "search", "cnn", "--resume", run, "--backend", "reference", "--no-progress"]
    res = _torchrun([*resume, "--sync-bn"], tmp_path) if then == 2 else _alone(resume)
    assert res.returncode == 0, res.stderr[-3000:]
    done = load_checkpoint(run)
    assert done["epoch"] == 2
    torch.manual_seed(0)
    one = CNNSearch(CNNSearchConfig(**{**w.CNN, "epochs": 2}, backend="reference"), progress=False,
                    log=lambda _: None)
    one.run()
    for k, v in one.model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(done["model"][k], v, rtol=1e-4, atol=1e-6), k
    for a, b in zip(done["alphas"], one.model.arch_parameters()):  # Adam's steps (3e-4) divide rounding by |g|
        assert torch.allclose(a, b.detach(), rtol=1e-4, atol=1e-5)
    if then == 2:
        assert "2 processes (synchronised BatchNorm)" in open(os.path.join(run, "log.txt")).read()


def test_shares_and_errors():
    g = distributed.Group(1, 2)
    assert g.rows(8) == slice(4, 8) and g.rows(9) == slice(4, 8)
    x = torch.arange(10).view(5, 2)
    assert torch.equal(g.shard(x), x[2:4]) and torch.equal(g.shard(x, dim=1), x[:, 1:2])
    with pytest.raises(ValueError, match="batch_size"):
        distributed.Group(0, 4).rows(3)

    class Dead:
        def wait(self):
            raise RuntimeError("Connection closed by peer")

    with pytest.raises(RuntimeError, match="rank 1 of 2: averaging.*another process died"):
        g._wait(Dead(), "averaging the gradients")


def test_sync_batchnorm_alone_is_batchnorm_and_converts_in_place():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.BatchNorm2d(4, affine=False)))
    ref = __import__("copy").deepcopy(net)
    keys = list(net.state_dict())
    distributed.convert_sync_batchnorm(net)
    assert isinstance(net[1], distributed.SyncBatchNorm) and isinstance(net[3][0], distributed.SyncBatchNorm)
    assert list(net.state_dict()) == keys
    x = torch.randn(5, 3, 6, 6)
    assert torch.equal(net(x), ref(x))
    assert torch.equal(net[1].running_var, ref[1].running_var)


def test_sync_batchnorm_in_a_group_of_one_is_batchnorm_to_second_derivatives():
    """The differentiable all-reduce plumbing in-process (gloo, one rank): output, input and affine gradients and
    a double backward equal BatchNorm's; the running statistics too."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        ref = torch.nn.BatchNorm2d(3).double()
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        net = distributed.convert_sync_batchnorm(__import__("copy").deepcopy(ref))
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        outs = []
        with distributed.using(distributed.Group(0, 1)):
            for m in (ref, net):
                y = m(x)
                gx, gw = torch.autograd.grad((y * w).sum(), (x, m.weight), create_graph=True)
                ggx, = torch.autograd.grad((gx * gx).sum() + gw.sum(), x)
                outs.append((y, gx, gw, ggx, m.running_mean.clone(), m.running_var.clone()))
        for a, b in zip(*outs):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, capsys):
    from pynas.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["search", "cas"], ["search", "cnn", "--method", "random"], ["train", "rnn"],
                 ["search", "evolution"]):
        assert main(argv) == 2
        assert "nproc:" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["search", "cnn", "--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err
    assert main(["search", "cnn", "--sync-bn", "--epochs", "1"]) == 2
    assert "sync_bn" in capsys.readouterr().err
