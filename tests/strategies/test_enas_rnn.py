"""ENAS on the DARTS RNN space (pynas/strategies/enas.py): the controller samples the shared weights' cells and
learns by REINFORCE on validation rewards; the weight optimizer never touches the controller; a seeded search is
reproducible and resumes exactly; the derived cell is the best-rewarded controller sample."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pynas.rnn.genotypes import from_json
from pynas.search.rnn import RNNSearch, RNNSearchConfig, run_rnn_search
from pynas.strategies.enas import ENASArchitect, shared_parameters

TINY = dict(emsize=8, nhid=8, nhidlast=8, batch_size=4, bptt=6, eval_batch_size=2, epochs=2, steps_per_epoch=4,
            max_tokens=20000, seed=3, method="enas", enas_controller_steps=5, enas_derive_samples=4, enas_hidden=12)
QUIET = lambda s: None  # noqa: E731


def _cfg(**kw):
    return RNNSearchConfig.for_method(**dict(TINY, **kw))


def test_enas_search_trains_the_controller_and_resumes_exactly(tmp_path):
    full = run_rnn_search(_cfg(), save_dir=str(tmp_path / "a"), log=QUIET, progress=False)
    hist = full["history"]
    assert all({"controller_reward", "controller_entropy", "controller_baseline"} <= set(r) for r in hist)
    assert all(0 < r["controller_reward"] and math.isfinite(r["controller_baseline"]) for r in hist)
    part = RNNSearch(_cfg(), save_dir=str(tmp_path / "b"), log=QUIET, progress=False)
    assert isinstance(part.architect, ENASArchitect) and part.model.arch_parameters() == []
    ctrl = {id(p) for p in part.model.controller.parameters()}
    assert not any(id(p) in ctrl for g in part.optimizer.param_groups for p in g["params"])
    assert len(shared_parameters(part.model)) == len(part.optimizer.param_groups[0]["params"])
    before = [p.detach().clone() for p in part.model.controller.parameters()]
    part.run(until=1)
    assert any(not torch.equal(a, p) for a, p in zip(before, part.model.controller.parameters()))  # it learned
    assert all(p.grad is None for p in part.model.controller.parameters())
    assert math.isfinite(float(part.model.enas_baseline))
    resumed = run_rnn_search(_cfg(), save_dir=str(tmp_path / "b"), resume=str(tmp_path / "b"), log=QUIET,
                             progress=False)
    assert resumed["genotype"] == full["genotype"]
    for key in ("train_loss", "val_loss", "controller_reward", "controller_baseline"):
        assert repr([r[key] for r in resumed["history"]]) == repr([r[key] for r in hist]), key
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    top = ckpt["final"]["top"]
    assert len(top) == 4
    best = max(top, key=lambda r: (r["reward"], -r["sample"]))
    assert from_json(best["genotype"]) == from_json(json.dumps(full["genotype"]))
    # the derived cell is what `pynas train rnn` reads
    (tmp_path / "g.json").write_text(json.dumps(full["genotype"]))
    from pynas.rnn.genotypes import from_json as parse

    assert len(parse((tmp_path / "g.json").read_text()).recurrent) == 8


def test_enas_defaults_and_refusals():
    cfg = RNNSearchConfig.for_method("enas")
    assert (cfg.batch_size, cfg.epochs, cfg.enas_controller_steps, cfg.enas_controller_lr) == (64, 150, 2000, 3.5e-4)
    for kw, word in ((dict(unrolled=True), "unrolled"), (dict(enas_controller_steps=0), "enas_controller_steps"),
                     (dict(enas_baseline_decay=1.0), "enas_baseline_decay"), (dict(enas_temperature=0.0),
                                                                              "enas_temperature")):
        with pytest.raises(ValueError, match=word):
            RNNSearch(_cfg(**kw), log=QUIET, progress=False)
