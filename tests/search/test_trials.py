"""Trials: the CNN space's trial continues exactly from its checkpoint; the results file survives a cut line; the
in-process and Ray executors give the same search (Ray as a local cluster on the CPU)."""
from __future__ import annotations

import os
import random

import pytest
import torch

from pynas.cnn.genotypes import to_json
from pynas.cnn.trial import CNNTrialConfig, train_genotype
from pynas.search.trials import Trial, TrialStore, checkpoint_path, make_executor
from pynas.strategies import evolution as ev
from pynas.strategies.random_search import sample_cnn_genotype

TINY = dict(init_channels=4, layers=3, batch_size=8, total_steps=12, num_train=64, num_valid=32)


def _genotype(seed=0):
    return to_json(sample_cnn_genotype(random.Random(seed)))


def test_cnn_trial_split_equals_unsplit(tmp_path):
    cfg = CNNTrialConfig(**TINY)
    g = _genotype()
    whole = train_genotype(g, 0, 10, str(tmp_path / "a.pt"), 7, cfg)
    first = train_genotype(g, 0, 4, str(tmp_path / "b.pt"), 7, cfg)
    second = train_genotype(g, 4, 10, str(tmp_path / "b.pt"), 7, cfg)
    assert second["fitness"] == whole["fitness"] and second["steps"] == 10 and first["steps"] == 4
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # another seed trains another network
    other = train_genotype(g, 0, 10, str(tmp_path / "c.pt"), 8, cfg)
    c = torch.load(tmp_path / "c.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert 0.0 <= other["fitness"] <= 1.0


def test_cnn_trial_refuses_a_foreign_checkpoint_and_bad_spans(tmp_path):
    cfg = CNNTrialConfig(**TINY)
    g = _genotype()
    train_genotype(g, 0, 4, str(tmp_path / "a.pt"), 1, cfg)
    with pytest.raises(ValueError, match="checkpoint"):
        train_genotype(g, 6, 8, str(tmp_path / "a.pt"), 1, cfg)
    with pytest.raises(ValueError, match="checkpoint"):
        train_genotype(_genotype(1), 4, 8, str(tmp_path / "a.pt"), 1, cfg)
    with pytest.raises(ValueError, match="end"):
        train_genotype(g, 4, 4, str(tmp_path / "a.pt"), 1, cfg)
    with pytest.raises(ValueError, match="end"):
        train_genotype(g, 0, 13, str(tmp_path / "a.pt"), 1, cfg)
    with pytest.raises(ValueError, match="init_channels"):
        train_genotype(g, 0, 4, str(tmp_path / "a.pt"), 1, CNNTrialConfig(**dict(TINY, init_channels=3)))
    torch.save({"format": "pynas-cnn-trial", "config": {}, "version": 2, "checksum": "0"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="checksum"):
        train_genotype(g, 4, 8, str(tmp_path / "bad.pt"), 1, cfg)


def test_store_drops_a_cut_line_and_refuses_another_search(tmp_path):
    path = str(tmp_path / "trials.jsonl")
    store = TrialStore(path)
    t = Trial(0, "g", 0, 5, 0, 1)
    store.append(t, {"fitness": 0.5}, {"parent": None})
    with open(path, "a") as fh:
        fh.write('{"candidate": 1, "stage"')
    again = TrialStore(path)
    assert again.get(t)["fitness"] == 0.5 and len(TrialStore.read(path)) == 1
    again.append(Trial(1, "h", 0, 5, 0, 1), {"fitness": float("nan")})
    recs = TrialStore.read(path)
    assert len(recs) == 2 and recs[1]["fitness"] is None
    with pytest.raises(ValueError, match="another search"):
        TrialStore(path).get(Trial(0, "other", 0, 5, 0, 1))


def test_executor_names():
    with pytest.raises(ValueError, match="executor"):
        make_executor("spark")
    with pytest.raises(ValueError, match="ray_address"):
        make_executor("inprocess", address="localhost:6379")


def _cnn_search(folder, executor):
    cfg = ev.EvolutionConfig(population=3, sample_size=2, cycles=6, budgets=(4, 4), parallel=3, seed=2,
                             executor=executor, num_cpus=2)
    space = ev.CNNSpace(CNNTrialConfig(**TINY))
    return ev.Evolution(cfg, space, folder, log=lambda s: None).run()


def test_ray_and_inprocess_give_the_same_search(tmp_path):
    pytest.importorskip("ray")
    a = _cnn_search(str(tmp_path / "inprocess"), "inprocess")
    b = _cnn_search(str(tmp_path / "ray"), "ray")
    assert a["models"] == b["models"] and a["hurdles"] == b["hurdles"]
    assert a["trials"] == b["trials"] > 9  # promotions happened (across processes under Ray): more trials than models
    assert os.path.exists(checkpoint_path(str(tmp_path / "ray"), 0, 4))


def test_ray_refuses_trials_wider_than_the_local_cluster():
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match="threads"):
        make_executor("ray", num_cpus=1, threads=2)


def test_results_reach_the_callback_as_they_finish(tmp_path):
    from pynas.search.trials import InProcessExecutor

    seen = []
    cfg = CNNTrialConfig(**TINY)
    trials = [Trial(i, _genotype(i), 0, 2, 0, i) for i in range(2)]
    out = InProcessExecutor().run(train_genotype, trials, str(tmp_path), cfg, lambda i, r: seen.append((i, r)))
    assert [i for i, _ in seen] == [0, 1] and [r for _, r in seen] == out
