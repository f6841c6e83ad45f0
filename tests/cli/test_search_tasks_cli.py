"""``pynas search cas`` and ``pynas search mas``: a tiny run on the embedded tasks writes its table, genotypes and
results; ``--resume`` on the run folder finishes with the same table; bad settings exit 2 naming the flag."""
from __future__ import annotations

import json

import pytest

from pynas.cli import main

TINY = ["--n-tasks", "2", "--task-tokens", "8000", "--vocab-size", "300", "--train-epochs", "1",
        "--train-steps-per-epoch", "2", "--emsize", "8", "--nhid", "8", "--batch-size", "4", "--bptt", "5",
        "--epochs", "1", "--steps-per-epoch", "2", "--eval-batch-size", "2", "--enas-controller-steps", "2",
        "--enas-derive-samples", "2", "--enas-hidden", "8", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("kind", ["cas", "mas"])
def test_search_tasks_cli_runs_and_resumes(kind, tmp_path, capsys):
    folder = tmp_path / kind
    extra = ["--no-single-task"] if kind == "mas" else []
    assert main(["search", kind, *TINY, *extra, "--save", str(folder)]) == 0
    table = (folder / "table.md").read_text()
    assert table.count("\n") == (4 if kind == "cas" else 3)
    results = json.loads((folder / "results.json").read_text())
    assert results["settings"]["search"]["emsize"] == 8 and (folder / "genotypes").is_dir()
    assert "test ppl" in (folder / "log.txt").read_text()
    assert main(["search", kind, "--resume", str(folder), "--no-progress"]) == 0  # everything done: same table
    assert (folder / "table.md").read_text() == table
    capsys.readouterr()


def test_search_tasks_cli_errors(tmp_path, capsys):
    assert main(["search", "cas", *TINY, "--lambda-o", "-1", "--save", str(tmp_path / "a")]) == 2
    assert "lambda_o" in capsys.readouterr().err
    assert main(["search", "mas", *TINY, "--tasks", f"{tmp_path / 'missing'},{tmp_path}", "--save",
                 str(tmp_path / "b")]) == 2
    assert "folder" in capsys.readouterr().err
    assert main(["search", "cas", "--resume", str(tmp_path / "nothing")]) == 2
    assert "results.json" in capsys.readouterr().err
