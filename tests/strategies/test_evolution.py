"""Regularized evolution with progressive dynamic hurdles (pynas.strategies.evolution) on hand-made fitness values:
the hurdle rule, aging, the random control, reproducibility, resume after a kill; the mutations keep genotypes
valid; the CNN space's trials (a derived network trained for a step budget) continue exactly from their
checkpoints."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pynas.cnn.genotypes import from_json, to_json
from pynas.cnn.operations import PRIMITIVES
from pynas.search.trials import TrialStore
from pynas.strategies import evolution as ev
from pynas.strategies.random_search import sample_cnn_genotype

KILL_AFTER = {"n": None}


def bits_trial(genotype, start, end, checkpoint, seed, cfg):
    """A hand-made trial: the 'model' is its step count, kept in the checkpoint; fitness = ones / len + end / 1000
    (so a longer-trained model is fitter) + a seed-dependent jitter below 1e-3."""
    if KILL_AFTER["n"] is not None:
        if KILL_AFTER["n"] == 0:
            raise KeyboardInterrupt("killed")
        KILL_AFTER["n"] -= 1
    if start:
        steps = torch.load(checkpoint, weights_only=True)["steps"]
        assert steps == start, (steps, start)
    torch.save({"steps": end}, checkpoint)
    jitter = random.Random(seed).random() * 1e-4
    return {"fitness": genotype.count("1") / len(genotype) + end / 1000 + jitter, "seconds": 0.0}


@dataclasses.dataclass
class Cfg:
    total_steps: int = 1000
    threads: int = 1


class BitSpace(ev.Space):
    name = "bits"
    cfg = Cfg()

    def sample(self, rng):
        return "".join(rng.choice("01") for _ in range(8))

    def mutate(self, genotype, rng):
        i = rng.randrange(len(genotype))
        return genotype[:i] + ("1" if genotype[i] == "0" else "0") + genotype[i + 1:]

    def train(self):
        return bits_trial


def _search(tmp_path, name="run", **kw):
    settings = dict(population=6, sample_size=3, cycles=14, budgets=(10, 20, 40), seed=3)
    settings.update(kw)
    search = ev.Evolution(ev.EvolutionConfig(**settings), BitSpace(), str(tmp_path / name), log=lambda s: None)
    return search, search.run()


def test_hurdles_and_promotions_follow_the_rule(tmp_path):
    search, result = _search(tmp_path)
    models, hurdles = search.models, search.hurdles
    assert len(models) == 20 and len(hurdles) == 2
    # h0: the mean stage-0 fitness of the first 6 models (the population); h1: of those at stage 1 after 12
    assert hurdles[0] == pytest.approx(sum(m.fitness[0] for m in models[:6]) / 6)
    at1 = [m.fitness[1] for m in models[:12] if len(m.fitness) > 1]
    assert at1 and hurdles[1] == pytest.approx(sum(at1) / len(at1))
    for i, m in enumerate(models):
        # a model is promoted past hurdle k exactly when it beats it, once the hurdle exists when it is trained
        h0_set = i >= 6
        assert (len(m.fitness) > 1) == (h0_set and m.fitness[0] > hurdles[0]), (i, m.fitness)
        if len(m.fitness) > 1:
            h1_set = i >= 12
            assert (len(m.fitness) > 2) == (h1_set and m.fitness[1] > hurdles[1]), (i, m.fitness)
    # every stage continued from the previous one's checkpoint (bits_trial asserts it) and was recorded
    recs = TrialStore.read(str(tmp_path / "run" / "trials.jsonl"))
    assert len(recs) == sum(len(m.fitness) for m in models) == result["trials"]
    assert result["best"]["candidate"] == max(models, key=lambda m: (m.latest, len(m.fitness))).candidate


def test_aging_and_tournament(tmp_path):
    search, _ = _search(tmp_path, parallel=1)
    models = search.models
    for m in models[6:]:
        # the parent was alive: one of the 6 models made just before the child (the oldest left)
        assert m.candidate - 6 <= m.parent < m.candidate
        # and the child is one bit away from it
        assert sum(a != b for a, b in zip(m.genotype, models[m.parent].genotype)) == 1
    assert [m.candidate for m in search.population] == list(range(14, 20))


def test_random_control_samples_afresh(tmp_path):
    search, result = _search(tmp_path, method="random")
    assert all(m.parent is None for m in search.models) and len(search.models) == 20
    assert result["method"] == "random" and len(search.hurdles) == 2


def test_seeded_search_is_reproducible_and_parallel_rounds_are_deterministic(tmp_path):
    _, a = _search(tmp_path, "a")
    _, b = _search(tmp_path, "b")
    assert a["models"] == b["models"]
    _, c = _search(tmp_path, "c", seed=4)
    assert c["models"] != a["models"]
    _, p1 = _search(tmp_path, "p1", parallel=4)
    _, p2 = _search(tmp_path, "p2", parallel=4)
    assert p1["models"] == p2["models"]


def test_resume_after_a_kill_trains_only_what_is_left(tmp_path):
    _, whole = _search(tmp_path, "whole")
    KILL_AFTER["n"] = 9
    try:
        with pytest.raises(KeyboardInterrupt):
            _search(tmp_path, "killed")
    finally:
        KILL_AFTER["n"] = None
    path = tmp_path / "killed" / "trials.jsonl"
    assert len(TrialStore.read(str(path))) == 9
    with open(path, "a") as fh:  # a line cut by the kill
        fh.write('{"candidate": 9, "sta')
    search, resumed = _search(tmp_path, "killed")
    assert resumed["models"] == whole["models"]
    assert resumed["trained_here"] == whole["trials"] - 9
    assert len(TrialStore.read(str(path))) == whole["trials"]


def test_resume_with_other_settings_is_refused(tmp_path):
    _search(tmp_path, "r")
    with pytest.raises(ValueError, match="resume"):
        _search(tmp_path, "r", sample_size=2)


def test_bad_settings_name_themselves(tmp_path):
    for kw, word in ((dict(population=0), "population"), (dict(budgets=()), "budgets"), (dict(budgets=(5, 0)), "budgets"),
                     (dict(method="grid"), "method"), (dict(executor="spark"), "executor"),
                     (dict(cycles=-1), "cycles"), (dict(budgets=(600, 600)), "budgets")):
        with pytest.raises(ValueError, match=word):
            _search(tmp_path, "bad", **kw)


def test_cnn_mutation_keeps_genotypes_valid():
    rng = random.Random(0)
    ops = [p for p in PRIMITIVES if p != "none"]
    g = sample_cnn_genotype(rng)
    for _ in range(300):
        child = ev.mutate_cnn(g, rng, ops)
        diff = [(a, b) for cell in ("normal", "reduce") for a, b in zip(getattr(g, cell), getattr(child, cell)) if a != b]
        assert len(diff) == 1
        for genes in (child.normal, child.reduce):
            assert len(genes) == 8
            for node in range(4):
                (o1, i1), (o2, i2) = genes[2 * node], genes[2 * node + 1]
                assert o1 in ops and o2 in ops and i1 != i2 and 0 <= i1 < node + 2 and 0 <= i2 < node + 2
        assert from_json(to_json(child)) == child
        g = child


def test_order_mutation_swaps_two_different_sublayers():
    rng = random.Random(1)
    o = "sfsfsfsf"
    for _ in range(100):
        child = ev.mutate_order(o, rng)
        assert sorted(child) == sorted(o) and sum(a != b for a, b in zip(o, child)) == 2
        o = child
    with pytest.raises(ValueError, match="order"):
        ev.mutate_order("ssss", rng)
