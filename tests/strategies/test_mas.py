"""Multi-task architecture search (pynas/strategies/mas.py): the reward is the mean of the tasks' ENAS rewards
(against a reward written here from ENAS's definition), the weight steps take the tasks in turn, the comparison
table has the multi-task cell and each single-task cell on every task, and a killed run resumes exactly."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from pynas.rnn.data import get_batch
from pynas.rnn.genotypes import from_json
from pynas.search.rnn import RNNSearchConfig
from pynas.strategies import mas
from test_cas import SEARCH, TASKS, QUIET, _cached_tasks, _second, _tasks  # noqa: F401  (the fixture)


def _search():
    torch.manual_seed(0)
    return mas.MASSearch(RNNSearchConfig.for_method("enas", **SEARCH), list(_tasks(2, 8000, 300)), progress=False)


def _reward_ref(model, genotype, data, start, bptt, c=80.0):
    """ENAS's reward c / ppl on bptt steps from ``start``, from a zero hidden state, in eval mode."""
    x, y = get_batch(data, start, bptt)
    model.eval()
    model.set_arch(genotype)
    with torch.no_grad():
        log_prob, _ = model(x, model.init_hidden(data.size(1)))
        nll = F.nll_loss(log_prob.view(-1, log_prob.size(-1)), y)
    model.train()
    return c / math.exp(float(nll))


def test_mas_reward_is_the_mean_of_the_tasks_rewards():
    s = _search()
    g = s.model.controller.sample(torch.Generator().manual_seed(3))[0]
    got = s.architect.sample_reward(s, g, random.Random(11))
    rng = random.Random(11)
    refs = []
    for data in s.task_search:
        start = rng.randrange(0, max(data.size(0) - 1 - s.cfg.bptt, 0) + 1)
        refs.append(_reward_ref(s.model, g, data, start, s.cfg.bptt))
    assert len(refs) == 2 and refs[0] != refs[1]
    # float32: the search's loss is the fused decoder loss (pynas.ops.linear_nll), the reference's log_softmax and
    # nll_loss; they agree to float32 rounding of the NLL (a relative 1e-7 or so of the reward), not bit for bit
    assert got == pytest.approx(sum(refs) / 2, rel=2e-6)
    sel = s.architect.select_reward(s, g)
    assert sel == pytest.approx(sum(_reward_ref(s.model, g, d, 0, s.cfg.bptt) for d in s.task_search) / 2, rel=2e-6)


def test_mas_weight_steps_take_the_tasks_in_turn():
    s = _search()
    s.cfg.steps_per_epoch = 5
    seen = []
    update = s._weight_update

    def spy(data, targets, hidden):
        ptr = data.untyped_storage().data_ptr()
        seen.append([d.untyped_storage().data_ptr() for d in s.task_train].index(ptr))
        return update(data, targets, hidden)

    s._weight_update = spy
    loss, steps = s.train_epoch(0)
    assert steps == 5 and seen == [0, 1, 0, 1, 0] and math.isfinite(loss)


def test_mas_comparison_table_and_exact_resume(tmp_path):
    cfg = mas.MASConfig(**{**TASKS, "train_epochs": 1, "search": dict(SEARCH)})
    full = mas.run_mas(cfg, str(tmp_path / "full"), log=QUIET)
    assert list(full["cells"]) == ["multi-task", "stdlib-0", "stdlib-1"]
    for name, cell in full["cells"].items():
        with open(tmp_path / "full" / "genotypes" / f"{name}.json") as fh:
            assert from_json(fh.read()) == from_json(cell)
    for cell in full["scores"].values():
        assert list(cell) == ["stdlib-0", "stdlib-1"]
        assert all(1.0 < v["test_ppl"] < 1e4 for v in cell.values())
    lines = full["table"].splitlines()
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| multi-task cell", "| stdlib-0 cell", "| stdlib-1 cell"]
    assert sum("*" in ln for ln in lines[2:]) >= 2  # the best of each column starred
    folder = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):  # during the second search (the first single-task one)
        mas.run_mas(cfg, folder, log=_second("epoch 1/1 steps"))
    resumed = mas.run_mas(cfg, folder, log=QUIET)
    assert resumed["scores"] == full["scores"] and resumed["cells"] == full["cells"]
    only = mas.run_mas(mas.MASConfig(**{**TASKS, "train_epochs": 1, "single_task": False, "search": dict(SEARCH)}),
                       str(tmp_path / "multi"), log=QUIET)
    assert list(only["cells"]) == ["multi-task"] and only["scores"]["multi-task"] == full["scores"]["multi-task"]


def test_mas_errors():
    task = _tasks(2, 8000, 300)[0]
    cfg = RNNSearchConfig.for_method("enas", **SEARCH)
    with pytest.raises(ValueError, match="tasks"):
        mas.MASSearch(cfg, [task])
    with pytest.raises(ValueError, match="method"):
        mas.MASSearch(RNNSearchConfig.for_method("darts", **{k: v for k, v in SEARCH.items()
                                                              if not k.startswith("enas")}), [task, task])
    with pytest.raises(ValueError, match="single_task"):
        mas.check_config(mas.MASConfig(single_task="yes"))
