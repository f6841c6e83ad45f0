"""Training a derived CNN (pynas.train.cnn, ``pynas train cnn``, ``pynas eval cnn``): the schedule, the
augmentation, exact resume, checkpoints read safely, clear errors."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from pynas.cli import main
from pynas.cnn import PUBLISHED, derive, to_json
from pynas.cnn.data import make_shapes10
from pynas.search.loop import METRICS_NAME
from pynas.train.cnn import (CNNTrainConfig, CNNTraining, cutout, evaluate, evaluate_checkpoint,
                             run_training, train_batches)

TINY = dict(init_channels=4, layers=3, batch_size=8, num_train=32, num_test=16, steps_per_epoch=2)


def test_cutout_zeroes_one_clipped_square():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(400, 1, 12, 12)
    y = cutout(x, 4, g)
    zeros = (y == 0).squeeze(1)
    for img in zeros:
        rows, cols = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()
        assert len(rows) and len(cols) and len(rows) <= 4 and len(cols) <= 4
        assert int(img.sum()) == len(rows) * len(cols)  # one rectangle
    full = [int(img.sum()) for img in zeros]
    assert max(full) == 16 and min(full) < 16  # whole squares inside, clipped ones at the border


def test_batches_are_seeded_per_epoch_and_augmented():
    data = make_shapes10(20, seed=0)
    cfg = CNNTrainConfig(batch_size=8, seed=3)
    a = [x for x, _ in train_batches(data, cfg, 0)]
    b = [x for x, _ in train_batches(data, cfg, 0)]
    c = [x for x, _ in train_batches(data, cfg, 1)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert [len(x) for x in a] == [8, 8, 4]
    labels = torch.cat([y for _, y in train_batches(data, cfg, 0)])
    assert sorted(labels.tolist()) == sorted(data.labels.tolist())  # each image once per epoch


def test_schedule_and_history(tmp_path):
    cfg = CNNTrainConfig(epochs=3, drop_path_prob=0.3, learning_rate=0.1, learning_rate_min=0.01, **TINY)
    r = run_training(cfg, save_dir=str(tmp_path), progress=False, log=lambda s: None)
    for e, rec in enumerate(r["history"]):
        assert rec["lr"] == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * e / 3)))
        assert rec["drop_path_prob"] == pytest.approx(0.3 * e / 3)
    rows = (tmp_path / METRICS_NAME).read_text().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "lr", "drop_path_prob"] and len(rows) == 4
    assert r["test_acc"] == r["history"][-1]["test_acc"]


def test_resume_continues_exactly(tmp_path):
    cfg = CNNTrainConfig(epochs=2, drop_path_prob=0.2, **TINY)
    straight = run_training(cfg, progress=False, log=lambda s: None)
    first = CNNTraining(cfg, save_dir=str(tmp_path), progress=False, log=lambda s: None)
    first.run(until=1)
    assert first.epoch == 1 and (tmp_path / "checkpoint.pt").exists()
    resumed = run_training(CNNTrainConfig(), save_dir=str(tmp_path), resume=str(tmp_path), progress=False,
                           log=lambda s: None)
    for a, b in zip(straight["history"], resumed["history"]):
        for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[k] == b[k], k


def test_trains_a_searchs_genotype_file(tmp_path):
    g = derive(torch.randn(14, 8), torch.randn(14, 8))
    path = tmp_path / "genotype.json"
    path.write_text(to_json(g) + "\n")
    run = CNNTraining(CNNTrainConfig(genotype=str(path), epochs=1, **TINY), progress=False, log=lambda s: None)
    assert [c.reduction for c in run.model.cells] == [False, True, True]
    run.run()


def test_eval_of_a_checkpoint_equals_the_runs_last_test(tmp_path):
    cfg = CNNTrainConfig(epochs=1, **TINY)
    run = CNNTraining(cfg, save_dir=str(tmp_path), progress=False, log=lambda s: None)
    r = run.run()
    ev = evaluate_checkpoint(str(tmp_path))
    assert ev["test_acc"] == r["test_acc"] and ev["test_loss"] == pytest.approx(r["test_loss"], rel=1e-6)
    assert ev["epoch"] == 1 and ev["images"] == 16
    assert evaluate(run.model, run.test_data, 5, torch.device("cpu"))[1] == r["test_acc"]


@pytest.mark.parametrize("change,match", [
    (dict(genotype="NOPE"), "genotype: NOPE is neither a file nor one of DARTS_V1"),
    (dict(init_channels=5), "init_channels: expected an even number"),
    (dict(layers=2), "layers: expected at least 3"),
    (dict(drop_path_prob=1.0), "drop_path_prob"),
    (dict(data="cifar10"), "data_dir: --data cifar10 needs --data-dir"),
    (dict(auxiliary_weight=-1.0), "auxiliary_weight"),
])
def test_bad_settings_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        CNNTraining(CNNTrainConfig(**dict(TINY, **change)), progress=False)


def test_bad_genotype_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"genotype: .*bad.json is not JSON"):
        CNNTraining(CNNTrainConfig(genotype=str(bad), **TINY))
    g = json.loads(to_json(PUBLISHED["DARTS"]))
    g["normal"][0][0] = "conv_9x9"
    bad.write_text(json.dumps(g))
    with pytest.raises(ValueError, match=r"genotype: .*bad.json: text: unknown normal op 'conv_9x9'"):
        CNNTraining(CNNTrainConfig(genotype=str(bad), **TINY))


def test_a_search_checkpoint_is_not_a_training_one(tmp_path):
    from pynas.search.cnn import CNNSearchConfig, run_search

    run_search(CNNSearchConfig(epochs=1, batch_size=4, num_train=8, init_channels=4, layers=3, steps_per_epoch=1),
               save_dir=str(tmp_path), progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="checkpoint: .* is not a pynas training checkpoint"):
        evaluate_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="resume: .* is not a pynas training checkpoint"):
        run_training(CNNTrainConfig(**TINY), resume=str(tmp_path), progress=False)


def test_cli_train_then_eval(tmp_path, capsys):
    save = str(tmp_path / "run")
    argv = ["train", "cnn", "--init-channels", "4", "--layers", "3", "--batch-size", "8", "--num-train", "16",
            "--num-test", "8", "--epochs", "1", "--steps-per-epoch", "1", "--save", save, "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test accuracy: " in out and os.path.exists(os.path.join(save, "log.txt"))
    assert main(["eval", "cnn", "--checkpoint", save]) == 0
    assert "test accuracy: " in capsys.readouterr().out
    assert main(["train", "cnn", "--genotype", str(tmp_path / "missing.json"), "--save", str(tmp_path / "r2")]) == 2
    assert "genotype:" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r2")  # nothing made for a run refused up front


def test_crop_pads_with_black():
    from pynas.cnn.data import ImageData, augment_batch, padding_value

    x = torch.zeros(64, 3, 6, 6) + 5.0
    data = ImageData(x, torch.zeros(64, dtype=torch.long), 10, "cifar10")
    fill = padding_value(data)
    y = augment_batch(x, torch.Generator().manual_seed(0), pad=2, fill=fill)
    values = {round(v, 5) for v in y[:, 0].flatten().tolist()}
    assert values <= {5.0, round(float(fill[0]), 5)} and len(values) == 2  # inside, or a black border pixel
    assert padding_value(ImageData(x, data.labels, 10, "shapes10")) is None


def test_cifar10_train_and_test_splits(tmp_path):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = 12 if name == "test_batch" else 8
        with open(root / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, fh)
    cfg = CNNTrainConfig(data="cifar10", data_dir=str(tmp_path), epochs=1, **dict(TINY, num_train=None,
                                                                                     num_test=None))
    run = CNNTraining(cfg, progress=False, log=quiet_log)
    assert len(run.train_data) == 40 and len(run.test_data) == 12  # all five training batches; the test batch
    r = run.run()
    assert 0.0 <= r["test_acc"] <= 100.0 and len(r["history"]) == 1


def quiet_log(s):
    pass
