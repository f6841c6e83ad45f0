"""Continual architecture search (pynas/strategies/cas.py) and what it shares with MAS (pynas/search/lm_tasks.py):
the penalties as the code groups them, the weight penalty in the search's weight step, the run's table, the
weights carried from task to task, exact resume after a kill at any part, user task files."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from pynas.rnn.genotypes import from_json
from pynas.search import lm_tasks
from pynas.search.rnn import RNNSearch, RNNSearchConfig
from pynas.strategies import cas
from pynas.strategies.cas_penalties import cell_weight_names, first_task_penalty

SEARCH = dict(emsize=8, nhid=8, nhidlast=8, batch_size=4, bptt=5, epochs=1, steps_per_epoch=2, eval_batch_size=2,
              enas_controller_steps=2, enas_derive_samples=2, enas_hidden=8, seed=5)
TASKS = dict(n_tasks=2, task_tokens=8000, vocab_size=300, train_epochs=2, train_steps_per_epoch=2)
QUIET = lambda s: None  # noqa: E731


@functools.lru_cache(maxsize=None)
def _tasks(n, tokens, vocab):
    from pynas.rnn.tasks import make_stdlib_tasks

    return tuple(make_stdlib_tasks(n, tokens, vocab))


@pytest.fixture(autouse=True)
def _cached_tasks(monkeypatch):
    """The stdlib tasks are built once per test session (each build reads the standard library)."""
    def load(s):
        if s.tasks != "stdlib":
            return lm_tasks.load_tasks(s)
        lm_tasks.check_task_settings(s)
        return list(_tasks(s.n_tasks, s.task_tokens, s.vocab_size))
    monkeypatch.setattr(cas, "load_tasks", load)
    from pynas.strategies import mas
    monkeypatch.setattr(mas, "load_tasks", load)


def _cfg(**kw):
    return cas.CASConfig(**{**TASKS, "search": dict(SEARCH), **kw})


def test_first_task_penalty_groups_output_units_of_the_cell(tmp_path):
    torch.manual_seed(0)
    search = RNNSearch(RNNSearchConfig.for_method("enas", **SEARCH), progress=False,
                       corpus=_tasks(2, 8000, 300)[0])
    model = search.model.double()
    names = cell_weight_names(model)
    assert names == ["rnns.0._W0"] + [f"rnns.0._Ws.{i}" for i in range(8)]
    pen = cas._penalty(model, 0, _cfg(), None)
    # the code: W.norm(2, dim=1) over nn.Linear (out, in) weights, |v|_1 for vectors; pynas's cell stores (in, out)
    ref = 0.0
    for n, p in model.named_parameters():
        if n.startswith("controller."):
            continue
        w = p.detach().t() if n in names else p.detach()
        ref = ref + (w.norm(dim=1).sum() if w.dim() == 2 else w.abs().sum())
    assert torch.allclose(pen(), cas.FIRST_TASK_LAMBDA_BS * ref, rtol=1e-12, atol=0)
    out = pen()
    out.backward()
    assert all(p.grad is None for p in model.controller.parameters())
    w0 = model.rnns[0]._W0
    col = w0.detach()[:, 0]
    assert torch.allclose(w0.grad[:, 0], cas.FIRST_TASK_LAMBDA_BS * col / col.norm(), rtol=1e-10, atol=0)
    assert first_task_penalty(model, 1.0, select={"rnns.0._W0"}).item() == pytest.approx(
        float(w0.detach().norm(dim=1).sum()))  # untransposed: rows are input units


def test_later_task_penalty_is_zero_at_the_previous_weights_and_grows_with_the_change():
    torch.manual_seed(0)
    search = RNNSearch(RNNSearchConfig.for_method("enas", **SEARCH), progress=False,
                       corpus=_tasks(2, 8000, 300)[0])
    model = search.model.double()
    cell = model.genotype()
    pen = cas._penalty(model, 1, _cfg(), cell)
    assert float(pen().detach()) == 0.0
    assert "controller.lstm.weight_ih" not in pen.names and "rnns.0._W0" in pen.names
    with torch.no_grad():
        model.rnns[0]._W0.add_(0.01)
    assert float(pen().detach()) > 0
    assert cas._penalty(model, 1, _cfg(penalties=False), cell) is None


def test_weight_penalty_enters_the_weight_step():
    cfg = RNNSearchConfig.for_method("enas", **{**SEARCH, "clip": 1e9, "wdecay": 0.0})
    task = _tasks(2, 8000, 300)[0]
    ends = []
    for c in (0.0, 0.5):
        torch.manual_seed(1)
        s = RNNSearch(cfg, progress=False, corpus=task)
        s.cfg.steps_per_epoch = 1
        p = s.model.decoder.bias
        s.weight_penalty = (lambda p=p, c=c: c * p.sum())
        s.train_epoch(0)
        ends.append(p.detach().clone())
    diff = ends[1] - ends[0]  # SGD: the penalty's gradient c, times the step's lr (lr or lr * seq_len / bptt)
    scale = -diff / 0.5
    assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-5)
    assert any(abs(float(scale[0]) - cfg.lr * k / cfg.bptt) < 1e-4 * cfg.lr for k in (cfg.bptt, cfg.bptt // 2))


def _interrupt_at(text):
    def log(line):
        if text in line:
            raise KeyboardInterrupt(text)
    return log


def test_cas_table_weights_carried_and_exact_resume(tmp_path):
    full = cas.run_cas(_cfg(), str(tmp_path / "full"), log=QUIET)
    steps = full["steps"]
    assert [s["task"] for s in steps] == ["stdlib-0", "stdlib-1"]
    assert list(steps[0]["scores"]) == ["stdlib-0"] and list(steps[1]["scores"]) == ["stdlib-0", "stdlib-1"]
    for s in steps:
        for v in s["scores"].values():
            assert 1.0 < v["test_ppl"] < 1e4 and 1.0 < v["valid_ppl"] < 1e4
        assert len(s["train"]) == 2
    lines = full["table"].splitlines()
    assert len(lines) == 4 and lines[2].startswith("| after task 1") and lines[3].startswith("| after task 2")
    for s in steps:  # genotype files that pynas train rnn reads
        with open(tmp_path / "full" / "genotypes" / f"{s['task']}.json") as fh:
            assert from_json(fh.read()) == from_json(s["genotype"])
        assert (tmp_path / "full" / "genotypes" / f"{s['task']}.svg").read_text().startswith("<svg")
    # task 2 starts from theta_1: its ENAS search's first weights are the saved theta_1
    theta1 = lm_tasks.load_checkpoint(str(tmp_path / "full" / "task1-stdlib-0" / "theta.pt"), "pynas-cas-weights")
    theta2 = lm_tasks.load_checkpoint(str(tmp_path / "full" / "task2-stdlib-1" / "theta.pt"), "pynas-cas-weights")
    assert set(theta1["model"]) == set(theta2["model"])
    assert not any(k.startswith("controller.") for k in theta1["model"])
    # a kill during task 2's search, then one during its cell's training: each resume ends as the full run did
    folder = str(tmp_path / "killed")
    for where in ("epoch 1/1", "cas: task 2 train epoch 2/2"):
        with pytest.raises(KeyboardInterrupt):
            cas.run_cas(_cfg(), folder, log=_interrupt_at(where) if where.startswith("cas") else
                        _second(where))
    resumed = cas.run_cas(_cfg(), folder, log=QUIET)
    assert resumed["table"] == full["table"]
    for a, b in zip(resumed["steps"], steps):
        assert a["scores"] == b["scores"] and a["genotype"] == b["genotype"]
    with pytest.raises(ValueError, match="other settings"):
        cas.run_cas(_cfg(lambda_o=0.5), folder, log=QUIET)


def _second(text):
    """A logger raising at the second line holding ``text`` (task 2's search epoch)."""
    seen = []

    def log(line):
        if text in line:
            seen.append(line)
            if len(seen) == 2:
                raise KeyboardInterrupt(text)
    return log


def test_cas_control_without_penalties_differs(tmp_path):
    a = cas.run_cas(_cfg(train_epochs=1), str(tmp_path / "a"), log=QUIET)
    b = cas.run_cas(_cfg(train_epochs=1, penalties=False, lambda_bs=1.0, lambda_o=1.0), str(tmp_path / "b"),
                    log=QUIET)
    c = cas.run_cas(_cfg(train_epochs=1, lambda_bs=1.0, lambda_o=1.0), str(tmp_path / "c"), log=QUIET)
    assert a["steps"][0]["scores"] == c["steps"][0]["scores"]  # the later tasks' lambdas do not touch task 1
    ta, tb = a["steps"][0]["scores"]["stdlib-0"], b["steps"][0]["scores"]["stdlib-0"]
    assert ta != tb and ta["test_ppl"] == pytest.approx(tb["test_ppl"], rel=1e-4)  # task 1's penalty is 1e-7
    assert c["steps"][1]["scores"]["stdlib-1"]["test_ppl"] != pytest.approx(
        b["steps"][1]["scores"]["stdlib-1"]["test_ppl"], rel=1e-3)


@pytest.mark.parametrize("bad, match", [
    (dict(n_tasks=1), "n_tasks"), (dict(lambda_o=-1.0), "lambda_o"), (dict(penalties=1), "penalties"),
    (dict(search={"method": "darts"}), "search"), (dict(search={"bptt": 0}), "bptt"),
    (dict(search={"nosuch": 1}), "search"), (dict(tasks=""), "tasks"), (dict(train_epochs=0), "train_epochs")])
def test_cas_settings_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        cas.check_config(cas.CASConfig(**bad))


def test_user_task_files(tmp_path):
    words = "the cat sat on the mat and the dog ran to the cat while the bird sang".split()
    rng = __import__("random").Random(0)
    folder = tmp_path / "text"
    folder.mkdir()
    for name, n in (("train.txt", 400), ("valid.txt", 40), ("test.txt", 40)):
        (folder / name).write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(n)))
    tsv = tmp_path / "data.tsv"
    tsv.write_text("id\ttext\n" + "\n".join(f"{i}\t" + " ".join(rng.choice(words) for _ in range(8))
                                               for i in range(500)))
    tasks = lm_tasks.load_tasks(lm_tasks.TaskSettings(tasks=f"{folder},{tsv}:text", vocab_size=10))
    assert [t.name for t in tasks] == ["0-text", "1-data.tsv"]
    assert tasks[0].dictionary is tasks[1].dictionary or tasks[0].ntokens == tasks[1].ntokens == 10
    assert all(t.train.numel() > 0 and t.valid.numel() > 0 and t.test.numel() > 0 for t in tasks)
    with pytest.raises(ValueError, match="tasks"):
        lm_tasks.load_tasks(lm_tasks.TaskSettings(tasks=str(folder)))
    with pytest.raises(FileNotFoundError, match="folder"):
        lm_tasks.load_tasks(lm_tasks.TaskSettings(tasks=f"{folder},{tmp_path / 'none'}"))


def test_results_file_refuses_damage(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="resume"):
        lm_tasks.Results(str(tmp_path), {"a": 1})
    (tmp_path / "results.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not a pynas results file"):
        lm_tasks.Results(str(tmp_path), {"a": 1})
