"""The search loop, checkpoints, resume and the command line, on tiny sizes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pynas.cnn.data import augment_batch, load_cifar10, make_shapes10
from pynas.search import CNNSearch, CNNSearchConfig, atomic_save, load_checkpoint, run_search

TINY = dict(num_train=32, batch_size=8, init_channels=2, layers=2, steps_per_epoch=2, epochs=2)


def _state(search):
    sd = {k: v.clone() for k, v in search.model.state_dict().items()}
    alphas = [a.detach().clone() for a in search.model.arch_parameters()]
    return sd, alphas


@pytest.mark.parametrize("unrolled", [False, True], ids=["first-order", "second-order"])
def test_resume_continues_exactly(tmp_path, unrolled):
    cfg = CNNSearchConfig(unrolled=unrolled, **TINY)
    straight = CNNSearch(cfg, save_dir=str(tmp_path / "a"), log=lambda s: None, progress=False)
    straight.run()

    first = CNNSearch(cfg, save_dir=str(tmp_path / "b"), log=lambda s: None, progress=False)
    first.run(until=1)  # the process "stops" after epoch 1
    assert first.epoch == 1
    result = run_search(cfg, save_dir=str(tmp_path / "b"), resume=str(tmp_path / "b"), log=lambda s: None,
                        progress=False)
    resumed = load_checkpoint(str(tmp_path / "b"))
    assert resumed["epoch"] == 2
    sd_a, al_a = _state(straight)
    for k, v in sd_a.items():
        assert torch.equal(v, resumed["model"][k]), k
    for a, b in zip(al_a, resumed["alphas"]):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in result["history"]]
    # the weights and alphas moved during the run
    assert not torch.equal(al_a[0], torch.zeros_like(al_a[0]))
    assert json.loads(open(tmp_path / "b" / "genotype.json").read()) == result["genotype"]


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "ck.pt")
    atomic_save({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_save({"b": Boom()}, path)
    assert torch.load(path) == {"a": 1}
    assert [p for p in os.listdir(tmp_path)] == ["ck.pt"]


def test_bad_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="resume"):
        load_checkpoint(str(bad))
    other = tmp_path / "other.pt"
    torch.save({"x": 1}, other)
    with pytest.raises(ValueError, match="not a pynas search checkpoint"):
        load_checkpoint(str(other))


def test_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        CNNSearch(CNNSearchConfig(epochs=0))
    with pytest.raises(ValueError, match="train_portion"):
        CNNSearch(CNNSearchConfig(train_portion=1.5))
    with pytest.raises(ValueError, match="data_dir"):
        CNNSearch(CNNSearchConfig(data="cifar10"))


def test_shapes10_deterministic_and_balanced():
    a = make_shapes10(200, seed=3)
    b = make_shapes10(200, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (200, 3, 32, 32)
    assert torch.bincount(a.labels, minlength=10).tolist() == [20] * 10
    assert not torch.equal(a.images, make_shapes10(200, seed=4).images)


def _write_fake_cifar(root, n=20):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    os.makedirs(root)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(root, name), "wb") as fh:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, fh)


def test_cifar10_reader(tmp_path):
    _write_fake_cifar(str(tmp_path / "cifar-10-batches-py"))
    data = load_cifar10(str(tmp_path))
    assert data.images.shape == (100, 3, 32, 32) and data.labels.shape == (100,)
    assert data.augment
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_cifar10(str(tmp_path / "nope"))


def test_augment_is_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, g, pad=0)
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pynas", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cli_search_and_resume(tmp_path):
    run = str(tmp_path / "run")
    common = ["--num-train", "32", "--batch-size", "8", "--init-channels", "2", "--layers", "2",
              "--steps-per-epoch", "2", "--no-progress"]
    res = _cli("search", "cnn", "--epochs", "1", "--save", run, *common)
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stdout.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 1 and "val_acc" in lines[0] and "genotype" in lines[0]
    assert os.path.isfile(os.path.join(run, "checkpoint.pt"))
    genotype = json.load(open(os.path.join(run, "genotype.json")))
    assert len(genotype["normal"]) == 8 and genotype["normal_concat"] == [2, 3, 4, 5]
    # resume of a finished run does nothing more and succeeds
    res = _cli("search", "cnn", "--resume", run, *common)
    assert res.returncode == 0, res.stderr
    assert not [l for l in res.stdout.splitlines() if l.startswith("epoch ")]


def test_cli_errors(tmp_path):
    res = _cli("search", "cnn", "--data", "cifar10", "--data-dir", str(tmp_path / "none"), "--no-progress")
    assert res.returncode == 2 and "data_dir" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    res = _cli("search", "cnn", "--resume", str(bad), "--no-progress")
    assert res.returncode == 2 and "resume" in res.stderr and "Traceback" not in res.stderr


def test_shapes10_is_learnable_well_above_chance():
    torch.manual_seed(0)
    data = make_shapes10(1200, seed=7)
    x_tr, y_tr, x_va, y_va = data.images[:1000], data.labels[:1000], data.images[1000:], data.labels[1000:]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for epoch in range(6):
        perm = torch.randperm(1000)
        for i in range(0, 1000, 50):
            idx = perm[i:i + 50]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (net(x_va).argmax(1) == y_va).float().mean().item()
    assert acc > 0.4, acc  # chance is 0.1


def test_cli_bad_setting_makes_no_run_folder(tmp_path):
    run = tmp_path / "run"
    res = _cli("search", "cnn", "--epochs", "0", "--save", str(run), "--no-progress")
    assert res.returncode == 2 and "epochs" in res.stderr and "Traceback" not in res.stderr
    assert not run.exists()
