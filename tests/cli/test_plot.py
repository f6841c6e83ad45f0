"""Pictures of genotypes (pynas.plot, ``pynas plot``) and the search's genotype.svg."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch

from pynas import plot
from pynas.cli import main
from pynas.cnn import PUBLISHED, derive
from pynas.rnn import genotypes as rnn_genotypes

NS = "{http://www.w3.org/2000/svg}"


def _texts(svg_text):
    root = ET.fromstring(svg_text)
    return [t.text for t in root.iter(NS + "text")], root


def test_cnn_cells_as_svg():
    g = PUBLISHED["DARTS_V2"]
    texts, root = _texts(plot.svg(plot.load_graphs("DARTS_V2")))
    assert texts.count("normal cell") == 1 and texts.count("reduction cell") == 1
    ops = [op for op, _ in g.normal] + [op for op, _ in g.reduce]
    for op in set(ops):
        assert texts.count(op) == ops.count(op), op
    for name in ("c_{k-2}", "c_{k-1}", "c_{k}", "0", "1", "2", "3"):
        assert texts.count(name) == 2, name
    # 8 op edges and 4 concat edges per cell
    assert len(list(root.iter(NS + "path"))) == 1 + 2 * (8 + 4)  # + the arrow marker


def test_graph_follows_the_genotype():
    g = derive(torch.randn(14, 8), torch.randn(14, 8))
    normal, reduce = plot.cnn_graphs(g)
    names = ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3"]
    assert [(a, b, op) for a, b, op in normal.edges if op] == [(names[j], str(e // 2), op)
                                                              for e, (op, j) in enumerate(g.normal)]
    pos, _, _ = plot.layout(normal)
    for a, b, _ in normal.edges:
        assert pos[a][0] < pos[b][0]  # every edge points right


def test_rnn_cell_as_svg(tmp_path):
    g = rnn_genotypes.Genotype([("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1), ("tanh", 2),
                                ("sigmoid", 5), ("tanh", 3), ("relu", 5)], list(range(1, 9)))
    path = tmp_path / "rnn.json"
    path.write_text(rnn_genotypes.to_json(g))
    out = tmp_path / "cell.svg"
    assert plot.plot(str(path), str(out), use_dot=False) == "pynas svg"
    texts, _ = _texts(out.read_text())
    assert texts.count("relu") == 3 and "h_{t}" in texts and "x_{t}" in texts and texts.count("8") == 1


def test_png_through_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cell.png"
    assert plot.plot("DARTS", str(out), use_dot=False) == "matplotlib"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_and_errors(tmp_path, capsys):
    out = tmp_path / "c.svg"
    assert main(["plot", "DARTS_V1", "-o", str(out)]) == 0 and out.exists()
    assert main(["plot", "DARTS", "-o", str(tmp_path / "c.pdf")]) == 2
    assert "output: expected a file name ending in .svg or .png" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"recurrent": [["swish", 0]], "concat": [1]}))
    assert main(["plot", str(bad), "-o", str(out)]) == 2
    assert "unknown recurrent op 'swish'" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "none.json"), "-o", str(out)]) == 2
    assert "is neither a file nor one of" in capsys.readouterr().err


def test_search_writes_the_picture_with_each_checkpoint(tmp_path):
    from pynas.search.cnn import CNNSearchConfig, run_search

    r = run_search(CNNSearchConfig(epochs=1, batch_size=4, num_train=8, init_channels=4, layers=3,
                                   steps_per_epoch=1), save_dir=str(tmp_path), progress=False, log=lambda s: None)
    texts, _ = _texts((tmp_path / "genotype.svg").read_text())
    assert "normal cell" in texts
    for op, _ in r["genotype"]["normal"]:
        assert op in texts


def test_search_metrics_and_curves(tmp_path, capsys):
    import math

    from pynas.search.cnn import CNNSearchConfig, run_search

    run_search(CNNSearchConfig(epochs=2, batch_size=4, num_train=8, init_channels=4, layers=3, steps_per_epoch=1),
               save_dir=str(tmp_path), progress=False, log=lambda s: None)
    columns = plot.read_metrics(str(tmp_path))
    assert columns["epoch"] == [1.0, 2.0]
    for name in ("lr", "train_loss", "val_loss", "val_acc", "seconds"):
        assert len(columns[name]) == 2, name
    # alphas start at 1e-3 * randn: the rows' softmax is almost uniform over the 8 candidates
    assert all(abs(v - math.log(8)) < 1e-3 for v in columns["alpha_entropy"])
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    assert main(["plot-run", str(tmp_path), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "alpha entropy" in capsys.readouterr().out
    assert main(["plot-run", str(tmp_path / "none"), "-o", str(out)]) == 2
    assert "run: no metrics.csv" in capsys.readouterr().err


def test_tensorboard_flag(tmp_path, capsys):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        have = True
    except ImportError:
        have = False
    argv = ["train", "cnn", "--init-channels", "4", "--layers", "3", "--batch-size", "8", "--num-train", "16",
            "--num-test", "8", "--epochs", "1", "--steps-per-epoch", "1", "--save", str(tmp_path / "r"),
            "--no-progress", "--tensorboard"]
    if not have:  # refused up front, naming the setting and what to install; nothing made
        assert main(argv) == 2
        assert "tensorboard: --tensorboard needs the tensorboard package" in capsys.readouterr().err
        assert not (tmp_path / "r").exists()
        return
    assert main(argv) == 0
    events = list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_ess_genotype_draws_both_inter_cell_dags_and_the_cell():
    from pynas.plot import load_graphs, svg

    text = json.dumps({"recurrent": [["relu", 0]] + [["tanh", i] for i in range(1, 8)], "concat": list(range(1, 9)),
                       "inter": {"m": 2, "f": [["relu", 1], ["sigmoid", 3]], "g": [["tanh", 0], ["identity", 2]]}})
    f, g, cell = load_graphs(text)
    assert (f.title, g.title, cell.title) == ("inter-cell f", "inter-cell g", "recurrent cell")
    assert [n for n, kind in f.nodes if kind == "input"] == ["h_{t-1}", "x_{t-1}", "x_{t-2}"]
    assert [n for n, kind in g.nodes if kind == "input"] == ["x_{t}", "h_{t-1}", "h_{t-2}"]
    assert ("x_{t-1}", "1", "relu") in f.edges and ("1", "2", "sigmoid") in f.edges  # j = m + 1: node 1
    assert ("x_{t}", "1", "tanh") in g.edges and ("h_{t-2}", "2", "identity") in g.edges
    assert ("1", "h^_{t-1}", "") in f.edges and ("2", "x^_{t}", "") in g.edges
    assert ("x^_{t}", "0", "") in cell.edges and ("h^_{t-1}", "0", "") in cell.edges
    assert svg([f, g, cell]).count("<text") > 20
