"""Plain random search (pynas.strategies.random_search): the samplers, the one-hot architectures, selection by
validation (never the test split), seeded runs, resume after a kill, clear errors. Tiny networks, a few
seconds each."""
from __future__ import annotations

import json
import os
import random
from collections import Counter

import pytest
import torch

import pynas.train.cnn as train_cnn
import pynas.train.rnn as train_rnn
from pynas.cnn.genotypes import DARTS_V2, Genotype, from_json, parse_cell, to_json
from pynas.cnn.operations import PRIMITIVES
from pynas.rnn import genotypes as rnn_genotypes
from pynas.rnn.data import stdlib_min_tokens
from pynas.strategies import random_search as rs
from pynas.strategies.random_search import (CNNCandidateTraining, RandomSearch, RandomSearchConfig,
                                            best_candidate, cnn_arch_to_onehot,
                                            rnn_arch_to_onehot, run_random_search, sample_cnn_genotype,
                                            sample_rnn_genotype)

pytestmark = pytest.mark.usefixtures("one_thread")

CNN_TRAIN = dict(init_channels=2, layers=3, auxiliary=False, num_train=48, batch_size=16, cutout=False)


def cnn_cfg(**kw):
    base = dict(space="cnn", n_samples=3, seed=5, epochs=1, steps_per_epoch=2, valid_portion=0.25, train=CNN_TRAIN)
    base.update(kw)
    return RandomSearchConfig(**base)


@pytest.fixture(scope="module")
def rnn_train():
    return dict(emsize=8, nhid=8, batch_size=4, eval_batch_size=2, bptt=6, max_tokens=stdlib_min_tokens(16, 4, 2))


def rnn_cfg(train, **kw):
    base = dict(space="rnn", n_samples=3, seed=5, epochs=1, steps_per_epoch=2, train=train)
    base.update(kw)
    return RandomSearchConfig(**base)


def quiet(s):
    pass


# ----------------------------------------------------------------------------- samplers
def test_cnn_sampler_valid_and_uniform():
    rng = random.Random(0)
    ops, pairs, node3 = Counter(), Counter(), Counter()
    n = 2000
    for _ in range(n):
        g = sample_cnn_genotype(rng)
        assert g.normal_concat == [2, 3, 4, 5] and g.reduce_concat == [2, 3, 4, 5]
        for cell in (g.normal, g.reduce):
            assert len(cell) == 8
            for i in range(4):
                (o1, j1), (o2, j2) = cell[2 * i], cell[2 * i + 1]
                assert j1 != j2 and 0 <= j1 < i + 2 and 0 <= j2 < i + 2
                ops.update([o1, o2])
                if i == 1:
                    pairs[frozenset((j1, j2))] += 1
                if i == 3:
                    node3.update([j1, j2])
        assert from_json(to_json(g)) == g  # a genotype file takes it
    assert set(ops) == set(PRIMITIVES) - {"none"}
    expected = n * 16 / 7  # 16 genes a genotype
    assert all(abs(c - expected) < 0.05 * expected for c in ops.values()), ops  # ~5 standard deviations
    assert set(pairs) == {frozenset(p) for p in ((0, 1), (0, 2), (1, 2))}
    assert all(abs(c - n * 2 / 3) < 0.1 * n * 2 / 3 for c in pairs.values()), pairs
    assert set(node3) == set(range(5)) and all(abs(c - n * 4 / 5) < 0.1 * n * 4 / 5 for c in node3.values())


def test_cnn_sampler_none_only_when_allowed():
    rng = random.Random(1)
    ops = Counter(op for _ in range(500) for op, _ in sample_cnn_genotype(rng, allow_none=True).normal)
    assert set(ops) == set(PRIMITIVES) and abs(ops["none"] - 500) < 100  # 4000 genes, 1/8 each
    g = sample_cnn_genotype(random.Random(2), steps=3, multiplier=2, primitives=["none", "skip_connect"])
    assert [op for op, _ in g.normal + g.reduce] == ["skip_connect"] * 12 and g.normal_concat == [3, 4]
    assert sample_cnn_genotype(random.Random(7)) == sample_cnn_genotype(random.Random(7))


def test_rnn_sampler_valid_and_uniform():
    rng = random.Random(0)
    ops, last = Counter(), Counter()
    n = 2000
    for _ in range(n):
        g = sample_rnn_genotype(rng)
        assert g.concat == list(range(1, 9)) and len(g.recurrent) == 8
        for i, (op, j) in enumerate(g.recurrent):
            assert 0 <= j <= i
            ops[op] += 1
        last[g.recurrent[7][1]] += 1
        assert rnn_genotypes.from_json(rnn_genotypes.to_json(g)) == g
    assert set(ops) == {"tanh", "relu", "sigmoid", "identity"}
    assert all(abs(c - n * 2) < 0.05 * n * 2 for c in ops.values()), ops
    assert set(last) == set(range(8)) and all(abs(c - n / 8) < 0.2 * n / 8 for c in last.values()), last
    assert sample_rnn_genotype(random.Random(3), steps=4, concat=2).concat == [3, 4]


# ----------------------------------------------------------------------------- one-hot architectures
def test_cnn_onehot_hand_made():
    g = Genotype(normal=[("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("skip_connect", 2), ("sep_conv_3x3", 0)],
                 normal_concat=[2, 3],
                 reduce=[("avg_pool_3x3", 0), ("avg_pool_3x3", 1), ("dil_conv_5x5", 1), ("none", 2)],
                 reduce_concat=[2, 3])
    normal, reduce = cnn_arch_to_onehot(g, steps=2, primitives=PRIMITIVES)
    want_n, want_r = torch.zeros(5, 8), torch.zeros(5, 8)
    # node 0: edges 0, 1 (inputs 0, 1); node 1: edges 2, 3, 4 (inputs 0, 1, 2)
    want_n[1, 4] = want_n[0, 1] = want_n[4, 3] = want_n[2, 4] = 1.0
    want_r[0, 2] = want_r[1, 2] = want_r[3, 7] = want_r[4, 0] = 1.0
    assert torch.equal(normal, want_n) and torch.equal(reduce, want_r) and normal.dtype == torch.float32
    # the search network's layout: deriving from the one-hot gives the cells back (per node, in input order)
    n14, r14 = cnn_arch_to_onehot(DARTS_V2)
    assert n14.shape == (14, 8) and n14.sum() == 8
    for cell, onehot in ((DARTS_V2.normal, n14), (DARTS_V2.reduce, r14)):
        derived = parse_cell(onehot, 4)
        for i in range(4):
            assert set(derived[2 * i:2 * i + 2]) == set(cell[2 * i:2 * i + 2])


def test_rnn_onehot_hand_made():
    g = rnn_genotypes.DARTS_V2
    got = rnn_arch_to_onehot(g, 8, rnn_genotypes.PRIMITIVES)
    want = torch.zeros(36, 5)
    for row, col in ((0, 3), (2, 2), (4, 2), (7, 4), (12, 1), (20, 3), (24, 1), (33, 2)):
        want[row, col] = 1.0
    assert torch.equal(got, want)
    assert rnn_genotypes.parse_recurrent(got) == g.recurrent
    small = rnn_genotypes.Genotype(recurrent=[("relu", 0), ("tanh", 0), ("identity", 1)], concat=[1, 2, 3])
    want = torch.zeros(6, 5)
    want[0, 2] = want[1, 1] = want[4, 4] = 1.0
    assert torch.equal(rnn_arch_to_onehot(small, steps=3), want)


def test_onehot_errors():
    with pytest.raises(ValueError, match="normal has 8 genes, expected 4"):
        cnn_arch_to_onehot(DARTS_V2, steps=2)
    with pytest.raises(ValueError, match="not one of primitives"):
        cnn_arch_to_onehot(DARTS_V2, primitives=["none", "max_pool_3x3"])
    with pytest.raises(ValueError, match="genotype: expected a CNN Genotype"):
        cnn_arch_to_onehot(rnn_genotypes.DARTS_V2)
    bad = rnn_genotypes.Genotype(recurrent=[("relu", 1)], concat=[1])
    with pytest.raises(ValueError, match="node 0 can take a state 0..0"):
        rnn_arch_to_onehot(bad, steps=1)


def test_sampler_errors():
    with pytest.raises(ValueError, match="rng: expected a random.Random"):
        sample_cnn_genotype(0)
    with pytest.raises(ValueError, match="multiplier: expected at most steps"):
        sample_cnn_genotype(random.Random(0), steps=2, multiplier=3)
    with pytest.raises(ValueError, match="primitives: no op to sample"):
        sample_cnn_genotype(random.Random(0), primitives=["none"])
    with pytest.raises(ValueError, match="primitives: 'conv_7x7' is not a cnn op"):
        sample_cnn_genotype(random.Random(0), primitives=["conv_7x7"])
    with pytest.raises(ValueError, match="steps: expected a positive integer, got 0"):
        sample_rnn_genotype(random.Random(0), steps=0)
    with pytest.raises(ValueError, match="concat: expected at most steps"):
        sample_rnn_genotype(random.Random(0), steps=2, concat=4)


def test_best_candidate_rule():
    assert best_candidate([50.0, 70.0, 70.0, 10.0], "cnn") == 1  # highest, the tie to the lower index
    assert best_candidate([90.0, 40.0, 40.0, 60.0], "rnn") == 1  # lowest
    assert best_candidate([float("nan"), 300.0, float("inf")], "rnn") == 1
    assert best_candidate([float("nan"), float("nan")], "cnn") == 0


# ----------------------------------------------------------------------------- the search
def test_cnn_search_is_seeded_and_writes_its_folder(tmp_path):
    a = run_random_search(cnn_cfg(), save_dir=str(tmp_path / "a"), log=quiet, progress=False)
    b = run_random_search(cnn_cfg(), progress=False, log=quiet)
    assert [c["score"] for c in a["candidates"]] == [c["score"] for c in b["candidates"]]
    assert a["best"] == b["best"] and a["genotype"] == b["genotype"]
    rng = random.Random(5)
    sampled = [json.loads(to_json(sample_cnn_genotype(rng))) for _ in range(3)]
    assert [c["genotype"] for c in a["candidates"]] == sampled  # up front from random.Random(seed), in order
    assert a["genotype"] == sampled[a["best"]]
    folder = tmp_path / "a"
    assert json.loads((folder / "genotype.json").read_text()) == a["genotype"]
    lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2] and lines == a["candidates"]
    for i in range(3):
        assert (folder / f"candidate_{i}" / "checkpoint.pt").exists()
        assert json.loads((folder / f"candidate_{i}" / "genotype.json").read_text()) == sampled[i]
        header = (folder / f"candidate_{i}" / "metrics.csv").read_text().splitlines()[0]
        assert "val_acc" in header and "test" not in header
    assert all(r["metric"] == "val_acc" and 0 <= r["score"] <= 100 and r["epochs"] == 1 for r in lines)
    state = json.loads((folder / "random_search.json").read_text())
    assert state["config"]["n_samples"] == 3 and state["config"]["train"]["init_channels"] == 2
    c = run_random_search(cnn_cfg(seed=6), progress=False, log=quiet)
    assert [x["genotype"] for x in c["candidates"]] != sampled


def test_cnn_scores_on_the_held_out_training_images_never_the_test_split(monkeypatch):
    splits = []
    real_load = train_cnn.load_split

    def load(cfg, train):
        splits.append(train)
        return real_load(cfg, train)

    monkeypatch.setattr(train_cnn, "load_split", load)
    monkeypatch.setattr(rs, "load_split", load)
    full = real_load(train_cnn.CNNTrainConfig(**CNN_TRAIN), True)
    valid = full.images[36:]  # the last 0.25 of 48
    fake_acc = iter([30.0, 70.0, 50.0])

    def evaluate(model, data, batch_size, device):
        # anything but the validation part (the test split) would score 100 and win
        if len(data) != 12 or not torch.equal(data.images, valid):
            return 0.0, 100.0
        return 1.0, next(fake_acc)

    monkeypatch.setattr(train_cnn, "evaluate", evaluate)
    r = run_random_search(cnn_cfg(), progress=False, log=quiet)
    assert [c["score"] for c in r["candidates"]] == [30.0, 70.0, 50.0] and r["best"] == 1
    assert splits == [True]  # the training split, loaded once; never the test split


def test_rnn_search_scores_on_validation_text_never_test(rnn_train, monkeypatch, tmp_path):
    real = run_random_search(rnn_cfg(rnn_train, n_samples=2), save_dir=str(tmp_path), progress=False, log=quiet)
    again = run_random_search(rnn_cfg(rnn_train, n_samples=2), progress=False, log=quiet)
    assert [c["score"] for c in real["candidates"]] == [c["score"] for c in again["candidates"]]
    assert all(c["metric"] == "val_ppl" and c["score"] > 1 for c in real["candidates"])
    assert real["best"] == best_candidate([c["score"] for c in real["candidates"]], "rnn")
    assert rnn_genotypes.from_json(json.loads((tmp_path / "genotype.json").read_text())).concat == list(range(1, 9))

    models, seen = [], []
    losses = {0: 3.0, 1: 2.0, 2: 2.5}

    def mean_nll(model, data, bptt):
        if id(model) not in models:
            models.append(id(model))
        seen.append(data.size(1))
        return losses[models.index(id(model))] if data.size(1) == 2 else 0.1  # the test text (width 1) would win

    monkeypatch.setattr(train_rnn, "mean_nll", mean_nll)
    r = run_random_search(rnn_cfg(rnn_train), progress=False, log=quiet)
    assert r["best"] == 1 and [c["val_loss"] for c in r["candidates"]] == [3.0, 2.0, 2.5]
    assert seen == [2, 2, 2]  # eval_batch_size 2: the validation text only


def test_resume_after_a_kill(tmp_path, monkeypatch):
    cfg = cnn_cfg(epochs=2)
    reference = run_random_search(cfg, save_dir=str(tmp_path / "ref"), progress=False, log=quiet)
    folder = str(tmp_path / "run")
    real_epoch = CNNCandidateTraining.train_epoch

    def killed(self, epoch):
        if self.cfg.genotype == "candidate_1" and epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(CNNCandidateTraining, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        run_random_search(cfg, save_dir=folder, progress=False, log=quiet)
    results = os.path.join(folder, "results.jsonl")
    with open(results) as fh:
        assert [json.loads(line)["index"] for line in fh] == [0]
    with open(results, "a") as fh:
        fh.write('{"index": 1, "genotype": {"norm')  # a write cut by the kill

    built, epochs = [], []

    def counting(self, epoch):
        epochs.append((self.cfg.genotype, epoch))
        return real_epoch(self, epoch)

    real_init = CNNCandidateTraining.__init__

    def init(self, cfg, **kw):
        built.append(cfg.genotype)
        real_init(self, cfg, **kw)

    monkeypatch.setattr(CNNCandidateTraining, "train_epoch", counting)
    monkeypatch.setattr(CNNCandidateTraining, "__init__", init)
    with pytest.raises(ValueError, match="holds a random search already"):
        run_random_search(cfg, save_dir=folder, progress=False, log=quiet)
    logs = []
    r = run_random_search(None, resume=folder, log=logs.append, progress=False)
    assert built == ["candidate_1", "candidate_2"]  # candidate 0 is not trained again
    assert epochs == [("candidate_1", 1), ("candidate_2", 0), ("candidate_2", 1)]  # 1 continues from its checkpoint
    assert any("candidate 0 (1/3): finished before" in line for line in logs)
    def strip(records):
        return [{k: v for k, v in c.items() if k != "seconds"} for c in records]

    assert strip(r["candidates"]) == strip(reference["candidates"])  # exactly as if it had not stopped
    assert r["best"] == reference["best"] and r["genotype"] == reference["genotype"]
    with open(results) as fh:
        assert [json.loads(line)["index"] for line in fh] == [0, 1, 2]  # the cut line is gone

    # killed after candidate 2's last checkpoint but before its result line: nothing is trained again
    with open(results) as fh:
        kept = fh.readlines()[:2]
    with open(results, "w") as fh:
        fh.writelines(kept)
    built.clear()
    epochs.clear()
    r2 = run_random_search(None, resume=folder, log=quiet, progress=False)
    assert built == ["candidate_2"] and epochs == [] and r2["candidates"] == r["candidates"]


def test_corrupt_results_line_is_an_error(tmp_path):
    folder = str(tmp_path)
    run_random_search(cnn_cfg(n_samples=2), save_dir=folder, progress=False, log=quiet)
    path = os.path.join(folder, "results.jsonl")
    with open(path) as fh:
        lines = fh.readlines()
    with open(path, "w") as fh:
        fh.writelines(["{oops\n"] + lines)
    with pytest.raises(ValueError, match="results.jsonl: line 1 is not JSON"):
        run_random_search(None, resume=folder, progress=False, log=quiet)
    record = json.loads(lines[0])
    record["genotype"]["normal"][0] = ["max_pool_3x3", 0] if record["genotype"]["normal"][0][0] != "max_pool_3x3" \
        else ["avg_pool_3x3", 0]
    with open(path, "w") as fh:
        fh.writelines([json.dumps(record) + "\n"] + lines[1:])
    with pytest.raises(ValueError, match="candidate 0's genotype is not the one this search sampled"):
        run_random_search(None, resume=folder, progress=False, log=quiet)


@pytest.mark.parametrize("kw, message", [
    (dict(n_samples=0), "n_samples: expected a positive integer, got 0"),
    (dict(n_samples=True), "n_samples: expected a positive integer, got True"),
    (dict(space="mlp"), "space: expected 'cnn' or 'rnn', got 'mlp'"),
    (dict(epochs=0), "epochs: expected a positive integer, got 0"),
    (dict(steps_per_epoch=-1), "steps_per_epoch: expected a positive integer, got -1"),
    (dict(seed=-1), r"seed: expected an integer in \[0, 2\*\*32\)"),
    (dict(valid_portion=1.0), r"valid_portion: expected a finite number in \(0, 1\)"),
    (dict(valid_portion=0.01), "valid_portion: 0.01 of 48 training images leaves no validation image"),
    (dict(train={"layerz": 3}), "train: 'layerz' is not a setting of CNNTrainConfig"),
    (dict(train={"epochs": 3}), r"train: 'epochs' is a setting of the search itself"),
    (dict(train={"num_test": 10}), "num_test: a random search never uses the test split"),
    (dict(train=train_rnn.RNNTrainConfig()), "train: a cnn search trains with a CNNTrainConfig"),
    (dict(train=[1]), "train: expected a dict"),
    (dict(train=dict(CNN_TRAIN, init_channels=3)), "init_channels: expected an even number"),
    (dict(space="rnn", train=None, valid_portion=0.5), "valid_portion: the rnn space scores on the corpus"),
])
def test_bad_settings(kw, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_random_search(cnn_cfg(**kw), save_dir=str(tmp_path / "run"), progress=False, log=quiet)
    assert not (tmp_path / "run").exists()  # refused before any file


def test_resume_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no random search"):
        run_random_search(None, resume=str(tmp_path), progress=False, log=quiet)
    with pytest.raises(ValueError, match="save_dir: a resumed random search continues in its own folder"):
        run_random_search(None, save_dir=str(tmp_path / "x"), resume=str(tmp_path), progress=False, log=quiet)
    with pytest.raises(ValueError, match="cfg: a new random search needs its settings"):
        run_random_search(None, progress=False, log=quiet)


def test_data_error_leaves_no_run_folder(tmp_path):
    cfg = cnn_cfg(train=dict(CNN_TRAIN, data="cifar10", data_dir=str(tmp_path / "missing")))
    with pytest.raises((ValueError, OSError)):
        RandomSearch(cfg, save_dir=str(tmp_path / "run"), log=quiet, progress=False).run()
    assert not (tmp_path / "run").exists()


def test_candidate_trainer_resumes_its_checkpoint_only(tmp_path):
    folder = str(tmp_path)
    run_random_search(cnn_cfg(n_samples=1), save_dir=folder, progress=False, log=quiet)
    os.unlink(os.path.join(folder, "results.jsonl"))
    state_path = os.path.join(folder, "random_search.json")
    with open(state_path) as fh:
        state = json.load(fh)
    state["config"]["train"]["learning_rate"] = 0.5  # now the checkpoint is another training's
    with open(state_path, "w") as fh:
        json.dump(state, fh)
    with pytest.raises(ValueError, match="is not the training of candidate 0 of this search .*learning_rate"):
        run_random_search(None, resume=folder, progress=False, log=quiet)


def test_train_settings_as_a_config_or_a_dict():
    as_dict = RandomSearch(cnn_cfg(), log=quiet).cfg
    as_config = RandomSearch(cnn_cfg(train=train_cnn.CNNTrainConfig(epochs=7, seed=9, **CNN_TRAIN)), log=quiet).cfg
    assert as_dict == as_config and as_dict.epochs == 1 and as_dict.seed == 5  # the search's own fields win
    defaults = RandomSearch(RandomSearchConfig(space="rnn"), log=quiet).cfg
    assert (defaults.n_samples, defaults.epochs, defaults.valid_portion) == (8, 20, None)
    assert defaults.train["emsize"] == 850 and "genotype" not in defaults.train
    cnn = RandomSearch(RandomSearchConfig(), log=quiet)
    assert (cnn.cfg.n_samples, cnn.cfg.epochs, cnn.cfg.valid_portion, len(cnn.genotypes)) == (24, 10, 0.1, 24)
