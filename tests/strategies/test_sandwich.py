"""The sublayer-order search (pynas.strategies.sandwich): its candidates, one trial per distinct order, resume
after a kill, and evolution over orders (pynas.strategies.evolution's SublayerSpace)."""
from __future__ import annotations

import pytest

import pynas.sublayers.trial as sublayer_trial
from pynas.search.trials import TrialStore
from pynas.strategies import evolution as ev
from pynas.strategies import sandwich as sw
from pynas.sublayers import sublayer_weights

TINY = dict(d_model=16, heads=2, block=16, batch_size=4, eval_batches=2, max_tokens=20000, vocab_size=500)


def _cfg(**kw):
    settings = dict(n=3, steps=6, random_orders=2, baseline_seeds=2, seed=1, trial=dict(TINY))
    settings.update(kw)
    return sw.SandwichConfig(**settings)


def test_candidates_are_the_papers_families():
    cands = sw.candidates(_cfg())
    fams = [f for f, _, _ in cands]
    assert fams == ["interleaved"] * 2 + ["sandwich"] * 2 + ["balanced"] * 2 + ["same_params"] * 2
    assert [o for f, o, _ in cands if f == "sandwich"] == ["ssfsff", "sssfff"]  # k = 1, 2 (k = 3 repeats k = 2)
    assert [s for f, _, s in cands if f == "interleaved"] == [1, 2]
    base = sublayer_weights("sfsfsf", 16)
    assert all(sublayer_weights(o, 16) == base for f, o, _ in cands)  # every family at the baseline's weights
    assert all(sorted(o) == sorted("sfsfsf") for f, o, _ in cands if f == "balanced")
    assert sw.candidates(_cfg()) == cands and sw.candidates(_cfg(seed=2)) != cands


def test_search_trains_each_distinct_order_once_and_resumes_after_a_kill(tmp_path, monkeypatch):
    cfg = _cfg(ks=(0, 1))  # k = 0 is the baseline's string: trained once
    whole = sw.SandwichSearch(cfg, str(tmp_path / "whole"), log=lambda s: None).run()
    rows = whole["rows"]
    assert len(rows) == 8 and whole["trained_here"] == 7
    assert rows[0]["perplexity"] == rows[2]["perplexity"] and rows[2]["order"] == "sfsfsf"
    s = whole["summary"]
    assert s["interleaved"]["seeds"] == 2 and s["sandwich"]["of"] == 2
    calls = {"n": 0}
    real = sublayer_trial.train_order

    def dying(*args):
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(sublayer_trial, "train_order", dying)
    with pytest.raises(KeyboardInterrupt):
        sw.SandwichSearch(cfg, str(tmp_path / "killed"), log=lambda s: None).run()
    monkeypatch.setattr(sublayer_trial, "train_order", real)
    assert len(TrialStore.read(str(tmp_path / "killed" / "trials.jsonl"))) == 3
    resumed = sw.SandwichSearch.resume(str(tmp_path / "killed"), log=lambda s: None).run()
    assert resumed["trained_here"] == 4 and resumed["rows"] == rows


def test_bad_settings_name_themselves(tmp_path):
    for kw, word in ((dict(n=0), "n"), (dict(families=("grid",)), "families"), (dict(ks=(5,)), "ks"),
                     (dict(executor="spark"), "executor"), (dict(trial=dict(TINY, heads=3)), "heads")):
        with pytest.raises(ValueError, match=word):
            sw.SandwichSearch(_cfg(**kw), str(tmp_path / "bad"), log=lambda s: None)
    sw.SandwichSearch(_cfg(), str(tmp_path / "r"), log=lambda s: None)
    with pytest.raises(ValueError, match="resume"):
        sw.SandwichSearch(_cfg(steps=7), str(tmp_path / "r"), log=lambda s: None)


def test_evolution_over_orders_keeps_the_counts(tmp_path):
    space = ev.SublayerSpace(3, sublayer_trial.SublayerTrialConfig(**TINY, total_steps=8))
    cfg = ev.EvolutionConfig(population=3, sample_size=2, cycles=3, budgets=(4, 4), seed=0)
    result = ev.Evolution(cfg, space, str(tmp_path / "evo"), log=lambda s: None).run()
    assert len(result["models"]) == 6
    assert all(sorted(m["genotype"]) == sorted("sfsfsf") for m in result["models"])
    again = ev.Evolution.resume(str(tmp_path / "evo"), log=lambda s: None).run()
    assert again["models"] == result["models"] and again["trained_here"] == 0
