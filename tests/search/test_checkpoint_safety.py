"""Reading checkpoints and data safely: no pickle code runs, tampered or broken checkpoints are refused with
a clear message, stale temporaries are cleaned, a failed new run leaves no half-made run folder."""
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from pynas.search import CHECKPOINT_NAME, CNNSearchConfig, load_checkpoint, run_search

TINY = dict(num_train=8, batch_size=4, init_channels=2, layers=1, steps_per_epoch=1)
TINY_ARGS = ["--num-train", "8", "--batch-size", "4", "--init-channels", "2", "--layers", "1",
             "--steps-per-epoch", "1", "--no-progress"]


class Payload:
    """Unpickling this writes the marker file: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _quiet(_line):
    pass


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A run folder holding the checkpoint of a finished 1-epoch tiny search (of 2 epochs)."""
    run = tmp_path_factory.mktemp("genuine") / "run"
    run_search(CNNSearchConfig(epochs=2, **TINY), save_dir=str(run), log=_quiet, progress=False)
    # keep only epoch 1 of 2, so that a resume has an epoch left to run
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["epoch"] == 2
    return run


def _copy(genuine, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(genuine, dst)
    return dst


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pynas", *args], capture_output=True, text=True, timeout=300)


def _resave(path, ckpt, fix_checksum=False):
    if fix_checksum:
        from pynas.search import checkpoint_checksum

        ckpt = dict(ckpt)
        ckpt.pop("checksum", None)
        ckpt["checksum"] = checkpoint_checksum(ckpt)
    torch.save(ckpt, path)


# -- 1. no code runs from a checkpoint ------------------------------------------------------------------------------
def test_plain_pickle_payload_is_refused_api(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "checkpoint.pt"
    with open(bad, "wb") as fh:
        pickle.dump(Payload(marker), fh)
    with pytest.raises(ValueError, match="resume"):
        run_search(CNNSearchConfig(epochs=1, **TINY), resume=str(bad), log=_quiet, progress=False)
    assert not marker.exists()


def test_plain_pickle_payload_is_refused_cli(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "evil"
    folder.mkdir()
    with open(folder / CHECKPOINT_NAME, "wb") as fh:
        pickle.dump(Payload(marker), fh)
    res = _cli("search", "cnn", "--resume", str(folder), *TINY_ARGS)
    assert not marker.exists()
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pynas: error: resume:"), res.stderr
    assert "Traceback" not in res.stderr


def test_payload_in_a_genuine_checkpoint_is_refused(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    marker = tmp_path / "marker"
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt["history"].append(Payload(marker))
    torch.save(ckpt, run / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="resume") as e:
        run_search(CNNSearchConfig(epochs=2, **TINY), save_dir=str(run), resume=str(run), log=_quiet, progress=False)
    assert "exec" in str(e.value)  # names what it refused
    assert not marker.exists()
    res = _cli("search", "cnn", "--resume", str(run), *TINY_ARGS)
    assert not marker.exists()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "resume" in res.stderr, res.stderr


def test_cifar_batch_with_a_payload_is_refused(tmp_path):
    from pynas.cnn.data import load_cifar10

    marker = tmp_path / "marker"
    root = tmp_path / "cifar"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as fh:
            pickle.dump({"data": Payload(marker), "labels": [0]}, fh)
    with pytest.raises(ValueError, match="data_dir"):
        load_cifar10(str(root))
    assert not marker.exists()


def test_cifar_batches_of_numpy_still_load(tmp_path):
    import numpy as np

    from pynas.cnn.data import load_cifar10

    rng = np.random.default_rng(0)
    for protocol in (2, 4, 5):
        root = tmp_path / f"p{protocol}"
        root.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(root / name, "wb") as fh:
                pickle.dump({"batch_label": "training batch", "data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                             "labels": [int(v) for v in rng.integers(0, 10, 4)], "filenames": ["a.png"] * 4},
                            fh, protocol=protocol)
        data = load_cifar10(str(root))
        assert data.images.shape == (20, 3, 32, 32)


# -- 2. stale temporaries --------------------------------------------------------------------------------------------
def test_stale_temporaries_removed_on_resume_and_start(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    # a finished run: resume does nothing but still cleans its folder
    for i in range(3):
        (run / f".tmp-stale{i}.pt").write_bytes(b"half a checkpoint")
    (run / "notes.tmp").write_text("not ours")
    run_search(CNNSearchConfig(epochs=2, **TINY), save_dir=str(run), resume=str(run), log=_quiet, progress=False)
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]
    assert (run / "notes.tmp").exists()
    assert load_checkpoint(str(run))["epoch"] == 2
    # a new run into a folder holding temporaries
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".tmp-abc.pt").write_bytes(b"x")
    run_search(CNNSearchConfig(epochs=1, **TINY), save_dir=str(fresh), log=_quiet, progress=False)
    assert sorted(os.listdir(fresh)) == [CHECKPOINT_NAME, "genotype.json", "genotype.svg", "metrics.csv"]


# -- 5. broken or tampered checkpoints ----------------------------------------------------------------------------
def _resume(run, **kw):
    return run_search(CNNSearchConfig(epochs=2, **TINY, **kw), save_dir=str(run), resume=str(run), log=_quiet,
                      progress=False)


def test_checkpoint_holds_a_checksum(genuine):
    from pynas.search import checkpoint_checksum

    ckpt = load_checkpoint(str(genuine))
    assert ckpt["version"] == 2 and isinstance(ckpt["checksum"], str) and len(ckpt["checksum"]) == 64
    assert checkpoint_checksum(ckpt) == ckpt["checksum"]


def test_flipped_weight_is_refused(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.numel() > 1)
    ckpt["model"][name].view(-1)[0] += 1
    _resave(run / CHECKPOINT_NAME, ckpt)
    with pytest.raises(ValueError, match="checksum mismatch"):
        _resume(run)


def test_flipped_alpha_and_changed_history_are_refused(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    path = run / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    ckpt["alphas"][1][0, 0] += 1e-3
    _resave(path, ckpt)
    with pytest.raises(ValueError, match="checksum mismatch"):
        _resume(run)
    ckpt = torch.load(genuine / CHECKPOINT_NAME, weights_only=True)
    ckpt["history"][0]["val_loss"] = 0.0
    _resave(path, ckpt)
    with pytest.raises(ValueError, match="checksum mismatch"):
        _resume(run)


def test_version_1_without_checksum_still_resumes(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt.pop("checksum")
    ckpt["version"] = 1
    ckpt["epoch"] = 1
    ckpt["history"] = ckpt["history"][:1]
    _resave(run / CHECKPOINT_NAME, ckpt)
    out = _resume(run)
    assert len(out["history"]) == 2
    assert load_checkpoint(str(run))["version"] == 2


def test_version_2_without_checksum_is_refused(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt.pop("checksum")
    _resave(run / CHECKPOINT_NAME, ckpt)
    with pytest.raises(ValueError, match="checksum"):
        _resume(run)


def test_missing_alpha_tensor_is_refused(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt["alphas"] = ckpt["alphas"][:1]
    _resave(run / CHECKPOINT_NAME, ckpt, fix_checksum=True)
    with pytest.raises(ValueError, match=r"1 alpha tensor.*2"):
        _resume(run)


@pytest.mark.parametrize("key", ["optimizer", "epoch", "torch_rng", "arch_optimizer", "model", "alphas", "history"])
def test_missing_key_is_refused(genuine, tmp_path, key):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    del ckpt[key]
    _resave(run / CHECKPOINT_NAME, ckpt, fix_checksum=True)
    with pytest.raises(ValueError, match=f"resume: .*'{key}'"):
        _resume(run)


@pytest.mark.parametrize("key, value, message", [
    ("epoch", "one", "epoch"),
    ("epoch", 7, "epoch"),
    ("torch_rng", torch.zeros(3), "torch_rng"),
    ("history", {"a": 1}, "history"),
    ("alphas", torch.zeros(2), "alphas"),
])
def test_malformed_values_are_refused(genuine, tmp_path, key, value, message):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt[key] = value
    _resave(run / CHECKPOINT_NAME, ckpt, fix_checksum=True)
    with pytest.raises(ValueError, match=f"resume: .*{message}"):
        _resume(run)


def test_unknown_config_key_is_refused(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt["config"]["foo"] = 1
    _resave(run / CHECKPOINT_NAME, ckpt, fix_checksum=True)
    with pytest.raises(ValueError, match="resume: .*'foo'"):
        _resume(run)


@pytest.mark.parametrize("key, value", [("learning_rate", -1.0), ("grad_clip", float("nan")), ("seed", -3),
                                        ("epochs", "2")])
def test_tampered_config_is_revalidated(genuine, tmp_path, key, value):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt["config"][key] = value
    _resave(run / CHECKPOINT_NAME, ckpt, fix_checksum=True)
    with pytest.raises(ValueError, match=f"resume: .*{key}"):
        _resume(run)


def test_refusals_through_the_cli_are_one_line(genuine, tmp_path):
    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    del ckpt["optimizer"]
    _resave(run / CHECKPOINT_NAME, ckpt, fix_checksum=True)
    res = _cli("search", "cnn", "--resume", str(run), *TINY_ARGS)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "'optimizer'" in res.stderr


# -- 6. a failed new run leaves no half-made run folder ----------------------------------------------------------
def test_data_error_makes_no_run_folder(tmp_path):
    run = tmp_path / "run"
    empty = tmp_path / "nocifar"
    empty.mkdir()
    (empty / "data_batch_1").write_bytes(b"not a pickle")
    res = _cli("search", "cnn", "--data", "cifar10", "--data-dir", str(empty), "--save", str(run), *TINY_ARGS)
    assert res.returncode == 2 and "data_dir" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not run.exists()


def test_failure_in_the_first_epoch_removes_the_new_folder(tmp_path):
    run = tmp_path / "run"
    driver = (
        "import sys, pynas.search as s\n"
        "def boom(*a, **k):\n"
        "    raise RuntimeError('simulated failure in the first epoch')\n"
        "s.CNNSearch.run_epoch = boom\n"
        "from pynas.cli import main\n"
        f"sys.exit(main(['search', 'cnn', '--epochs', '1', '--save', {str(run)!r}] + {TINY_ARGS!r}))\n")
    res = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "simulated failure" in res.stderr, res.stderr
    assert not run.exists()
    # a folder that held files before is left as it was (log.txt included)
    run.mkdir()
    (run / "mine.txt").write_text("keep")
    res = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert sorted(os.listdir(run)) == ["log.txt", "mine.txt"]


def test_failure_in_the_first_epoch_api_removes_the_new_folder(tmp_path, monkeypatch):
    import pynas.search as s

    def boom(*a, **k):
        raise RuntimeError("simulated")

    monkeypatch.setattr(s.CNNSearch, "run_epoch", boom)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        run_search(CNNSearchConfig(epochs=1, **TINY), save_dir=str(run), log=_quiet, progress=False)
    assert not run.exists()


def test_failed_resume_deletes_nothing(genuine, tmp_path, monkeypatch):
    import pynas.search as s

    run = _copy(genuine, tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt["epoch"], ckpt["history"] = 1, ckpt["history"][:1]
    _resave(run / CHECKPOINT_NAME, ckpt, fix_checksum=True)
    before = sorted(os.listdir(run))

    def boom(*a, **k):
        raise RuntimeError("simulated")

    monkeypatch.setattr(s.CNNSearch, "run_epoch", boom)
    with pytest.raises(RuntimeError):
        _resume(run)
    assert sorted(os.listdir(run)) == before
