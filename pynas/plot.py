"""Pictures of genotypes: the CNN's normal and reduction cells, or the RNN's recurrent cell, as labelled DAGs.

The layout is pynas's own (nodes in columns by their depth, left to right, as the original visualiser's Graphviz
``rankdir=LR`` draws them), written as SVG with no dependency. PNG goes through Graphviz's ``dot`` when it is
on the PATH (it also lays out SVG then), else through matplotlib (``pip install pynas[plot]``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from html import escape
from typing import Dict, List, Optional, Tuple

INPUT_COLOUR, NODE_COLOUR, OUTPUT_COLOUR = "#b4eeb4", "#add8e6", "#eee8aa"  # the original's colours
BOX_W, BOX_H, COL_GAP, ROW_GAP, MARGIN, TITLE_H = 70.0, 30.0, 120.0, 26.0, 20.0, 28.0


@dataclass
class Graph:
    """A cell as nodes (name, kind: input, node or output) and labelled edges, with a title."""

    title: str
    nodes: List[Tuple[str, str]] = field(default_factory=list)
    edges: List[Tuple[str, str, str]] = field(default_factory=list)


def cnn_graphs(genotype) -> List[Graph]:
    """The normal and the reduction cell: inputs c_{k-2}, c_{k-1}, nodes 0.., output c_{k}."""
    graphs = []
    for title, genes, concat in (("normal cell", genotype.normal, genotype.normal_concat),
                                 ("reduction cell", genotype.reduce, genotype.reduce_concat)):
        g = Graph(title, [("c_{k-2}", "input"), ("c_{k-1}", "input")])
        names = ["c_{k-2}", "c_{k-1}"]
        for i in range(len(genes) // 2):
            g.nodes.append((str(i), "node"))
            names.append(str(i))
            for op, j in genes[2 * i:2 * i + 2]:
                g.edges.append((names[j], str(i), op))
        g.nodes.append(("c_{k}", "output"))
        for c in concat:
            g.edges.append((names[c], "c_{k}", ""))
        graphs.append(g)
    return graphs


def rnn_graph(genotype) -> Graph:
    """The recurrent cell: inputs x_{t}, h_{t-1} into node 0; node i + 1 from its predecessor with its
    activation; output h_{t}, the mean of the concat nodes."""
    g = Graph("recurrent cell", [("x_{t}", "input"), ("h_{t-1}", "input"), ("0", "node")])
    g.edges += [("x_{t}", "0", ""), ("h_{t-1}", "0", "")]
    for i, (op, j) in enumerate(genotype.recurrent):
        g.nodes.append((str(i + 1), "node"))
        g.edges.append((str(j), str(i + 1), op))
    g.nodes.append(("h_{t}", "output"))
    for c in genotype.concat:
        g.edges.append((str(c), "h_{t}", ""))
    return g


def inter_graphs(inter) -> List[Graph]:
    """ESS's inter-cell DAGs: f (h_{t-1} and the last m inputs -> h^_{t-1}) and g (x_{t} and the last m hidden
    states -> x^_{t}); node k from its predecessor (an input or an earlier node) with its activation; the output
    the mean of the nodes."""
    graphs = []
    for title, first, past, out, genes in (("inter-cell f", "h_{t-1}", "x", "h^_{t-1}", inter.f),
                                           ("inter-cell g", "x_{t}", "h", "x^_{t}", inter.g)):
        names = [first] + [f"{past}_{{t-{i}}}" for i in range(1, inter.m + 1)]
        g = Graph(title, [(n, "input") for n in names])
        for k, (op, j) in enumerate(genes):
            g.nodes.append((str(k + 1), "node"))
            g.edges.append((names[j], str(k + 1), op))
            names.append(str(k + 1))
        g.nodes.append((out, "output"))
        g.edges += [(str(k + 1), out, "") for k in range(len(genes))]
        graphs.append(g)
    return graphs


def load_graphs(source) -> List[Graph]:
    """Graphs of a genotype: a JSON file or text (CNN or RNN, told apart by its keys) or a published CNN name."""
    from ._genotype_files import load_named_or_file
    from .cnn import genotypes as cnn_genotypes
    from .rnn import genotypes as rnn_genotypes

    def parse(text) -> List[Graph]:
        data = json.loads(text) if isinstance(text, (str, bytes)) else text
        if isinstance(data, dict) and "recurrent" in data:
            genotype = rnn_genotypes.from_json(data)
            inter = getattr(genotype, "inter", None)
            if inter is None:
                return [rnn_graph(genotype)]
            cell = rnn_graph(genotype)  # ESS: the intra cell reads x^_{t} and h^_{t-1}
            cell.nodes[:2] = [("x^_{t}", "input"), ("h^_{t-1}", "input")]
            cell.edges[:2] = [("x^_{t}", "0", ""), ("h^_{t-1}", "0", "")]
            return inter_graphs(inter) + [cell]
        return cnn_graphs(cnn_genotypes.from_json(data))

    if not isinstance(source, str) or source.lstrip().startswith("{"):  # the text (or the dict) itself
        try:
            return parse(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"genotype: not JSON ({exc})") from None
    published = {name: cnn_graphs(g) for name, g in cnn_genotypes.PUBLISHED.items()}
    return load_named_or_file(source, published, parse)


def layout(g: Graph) -> Tuple[Dict[str, Tuple[float, float]], float, float]:
    """Centres of the boxes (columns by depth: inputs 0, a node one right of its deepest input) and the size."""
    preds: Dict[str, List[str]] = {n: [] for n, _ in g.nodes}
    for a, b, _ in g.edges:
        preds[b].append(a)
    col: Dict[str, int] = {}
    for name, kind in g.nodes:  # nodes come after their inputs
        col[name] = 0 if kind == "input" else 1 + max((col[p] for p in preds[name]), default=0)
    columns: Dict[int, List[str]] = {}
    for name, _ in g.nodes:
        columns.setdefault(col[name], []).append(name)
    rows = max(len(v) for v in columns.values())
    height = rows * BOX_H + (rows - 1) * ROW_GAP
    pos = {}
    for c, names in columns.items():
        top = (height - (len(names) * BOX_H + (len(names) - 1) * ROW_GAP)) / 2
        for r, name in enumerate(names):
            pos[name] = (MARGIN + c * (BOX_W + COL_GAP) + BOX_W / 2, TITLE_H + top + r * (BOX_H + ROW_GAP) + BOX_H / 2)
    width = 2 * MARGIN + len(columns) * BOX_W + (len(columns) - 1) * COL_GAP
    return pos, width, TITLE_H + height + MARGIN


def _label(name: str) -> str:
    return name  # the original's names, c_{k-2} and so on, as text


def svg(graphs: List[Graph]) -> str:
    """The graphs one under the other, as an SVG document."""
    parts, offset, total_w = [], 0.0, 0.0
    colours = {"input": INPUT_COLOUR, "node": NODE_COLOUR, "output": OUTPUT_COLOUR}
    for g in graphs:
        pos, w, h = layout(g)
        total_w = max(total_w, w)
        parts.append(f'<g transform="translate(0,{offset:.1f})">')
        parts.append(f'<text x="{MARGIN}" y="18" font-size="14" font-weight="bold">{escape(g.title)}</text>')
        for a, b, op in g.edges:
            (x1, y1), (x2, y2) = pos[a], pos[b]
            x1, x2 = x1 + BOX_W / 2, x2 - BOX_W / 2
            bend = 0.0 if abs(x2 - x1) <= COL_GAP + 1 else (y2 - y1 or BOX_H) * 0.3
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - bend
            parts.append(f'<path d="M{x1:.1f},{y1:.1f} Q{cx:.1f},{cy:.1f} {x2:.1f},{y2:.1f}" fill="none" '
                         f'stroke="#555" marker-end="url(#arrow)"/>')
            if op:
                lx, ly = 0.25 * x1 + 0.5 * cx + 0.25 * x2, 0.25 * y1 + 0.5 * cy + 0.25 * y2
                parts.append(f'<text x="{lx:.1f}" y="{ly - 3:.1f}" font-size="10" text-anchor="middle" '
                             f'paint-order="stroke" stroke="white" stroke-width="3">{escape(op)}</text>')
        for name, kind in g.nodes:
            x, y = pos[name]
            parts.append(f'<rect x="{x - BOX_W / 2:.1f}" y="{y - BOX_H / 2:.1f}" width="{BOX_W}" height="{BOX_H}" '
                         f'rx="6" fill="{colours[kind]}" stroke="#333"/>')
            parts.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" font-size="12" text-anchor="middle">'
                         f'{escape(_label(name))}</text>')
        parts.append("</g>")
        offset += h
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" height="{offset:.0f}" '
            f'viewBox="0 0 {total_w:.1f} {offset:.1f}" font-family="Helvetica, Arial, sans-serif">'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>'
            f'<rect width="100%" height="100%" fill="white"/>')
    return head + "".join(parts) + "</svg>\n"


def dot_source(graphs: List[Graph]) -> str:
    """The graphs as one Graphviz digraph (a cluster each), left to right."""
    colours = {"input": INPUT_COLOUR, "node": NODE_COLOUR, "output": OUTPUT_COLOUR}
    lines = ['digraph genotype {', '  rankdir=LR; node [style="rounded,filled", shape=rect, fontname=Helvetica]; '
             'edge [fontname=Helvetica, fontsize=10];']
    for k, g in enumerate(graphs):
        lines.append(f'  subgraph cluster_{k} {{ label="{g.title}";')
        for name, kind in g.nodes:
            lines.append(f'    "{k}:{name}" [label="{_label(name)}", fillcolor="{colours[kind]}"];')
        for a, b, op in g.edges:
            lines.append(f'    "{k}:{a}" -> "{k}:{b}" [label="{op}"];')
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _png_matplotlib(graphs: List[Graph], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    except ImportError:
        raise RuntimeError("output: a PNG needs Graphviz's dot on the PATH or matplotlib (pip install pynas[plot]); "
                           "an .svg needs neither") from None
    sizes = [layout(g) for g in graphs]
    width, height = max(w for _, w, _ in sizes), sum(h for _, _, h in sizes)
    fig = plt.figure(figsize=(width / 72, height / 72), dpi=144)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    colours = {"input": INPUT_COLOUR, "node": NODE_COLOUR, "output": OUTPUT_COLOUR}
    offset = 0.0
    for g, (pos, _, h) in zip(graphs, sizes):
        ax.text(MARGIN, offset + 18, g.title, fontsize=10, fontweight="bold")
        for a, b, op in g.edges:
            (x1, y1), (x2, y2) = pos[a], pos[b]
            ax.add_patch(FancyArrowPatch((x1 + BOX_W / 2, offset + y1), (x2 - BOX_W / 2, offset + y2),
                                         arrowstyle="-|>", mutation_scale=8, color="#555",
                                         connectionstyle="arc3,rad=0.15" if abs(x2 - x1) > BOX_W + COL_GAP + 1
                                         else "arc3,rad=0"))
            if op:
                ax.text((x1 + x2) / 2, offset + (y1 + y2) / 2 - 3, op, fontsize=7, ha="center",
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
        for name, kind in g.nodes:
            x, y = pos[name]
            ax.add_patch(FancyBboxPatch((x - BOX_W / 2, offset + y - BOX_H / 2), BOX_W, BOX_H,
                                        boxstyle="round,pad=0,rounding_size=6", facecolor=colours[kind],
                                        edgecolor="#333"))
            ax.text(x, offset + y, _label(name), fontsize=9, ha="center", va="center")
        offset += h
    fig.savefig(path, dpi=144)
    plt.close(fig)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def plot(source, output: str, use_dot: Optional[bool] = None) -> str:
    """Draw a genotype (see :func:`load_graphs`) to ``output`` (.svg or .png); returns how it was drawn."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in (".svg", ".png"):
        raise ValueError(f"output: expected a file name ending in .svg or .png, got {output!r}")
    graphs = load_graphs(source)
    dot = shutil.which("dot") if use_dot is not False else None
    if dot:
        res = subprocess.run([dot, f"-T{ext[1:]}"], input=dot_source(graphs).encode(), capture_output=True,
                             timeout=60)
        if res.returncode == 0:
            _atomic_write(output, res.stdout)
            return "graphviz dot"
    if ext == ".svg":
        _atomic_write(output, svg(graphs).encode())
        return "pynas svg"
    _png_matplotlib(graphs, output)
    return "matplotlib"


def read_metrics(folder: str) -> Dict[str, List[float]]:
    """The numeric columns of a run folder's metrics.csv (a search or a training), by name."""
    import csv
    import math

    path = os.path.join(folder, "metrics.csv") if os.path.isdir(folder) else folder
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ValueError(f"run: no metrics.csv at {path} (a run folder of pynas search or pynas train)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"run: cannot read {path} ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise ValueError(f"run: {path} holds no epoch yet")
    columns: Dict[str, List[float]] = {}
    for name in rows[0]:
        try:
            values = [float(r[name]) for r in rows]
        except (TypeError, ValueError):
            continue  # a text column (the optimizer's kind)
        if all(math.isfinite(v) for v in values):
            columns[name] = values
    if "epoch" not in columns:
        raise ValueError(f"run: {path} has no epoch column")
    return columns


#: The panels of a run's curves: (title, columns drawn in it).
PANELS = (("loss", ("train_loss", "val_loss", "test_loss")),
          ("accuracy (%)", ("train_acc", "val_acc", "test_acc")),
          ("perplexity", ("train_ppl", "val_ppl")),
          ("learning rate", ("lr",)),
          ("alpha entropy (nats)", ("alpha_entropy",)),
          ("Hessian eigenvalue", ("hessian_eigenvalue",)),
          ("drop path probability", ("drop_path_prob",)))


def plot_run(folder: str, output: str) -> List[str]:
    """The per-epoch curves of a run folder (metrics.csv) as a PNG or SVG through matplotlib; returns the panels
    drawn."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in (".svg", ".png"):
        raise ValueError(f"output: expected a file name ending in .svg or .png, got {output!r}")
    columns = read_metrics(folder)
    panels = [(t, [c for c in names if c in columns]) for t, names in PANELS]
    panels = [(t, names) for t, names in panels if names]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("output: drawing a run's curves needs matplotlib (pip install pynas[plot])") from None
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), squeeze=False)
    epochs = columns["epoch"]
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            ax.plot(epochs, columns[name], marker="o" if len(epochs) < 30 else None, label=name)
        if title == "perplexity":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _save_figure(plt, fig, output, ext)
    return [t for t, _ in panels]


def plot_trials(records, hurdles, output: str, title: str = "") -> str:
    """Fitness against trial order (the Evolved Transformer paper's picture): one dot per trial, coloured by its
    stage, each hurdle a horizontal line; a PNG or SVG through matplotlib. Returns ``output``."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in (".svg", ".png"):
        raise ValueError(f"output: expected a file name ending in .svg or .png, got {output!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("output: drawing the trials needs matplotlib (pip install pynas[plot])") from None
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    stages = sorted({r["stage"] for r in records})
    for k in stages:
        pts = [(i + 1, r["fitness"]) for i, r in enumerate(records) if r["stage"] == k and r["fitness"] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, label=f"stage {k}", zorder=3)
    for k, h in enumerate(hurdles):
        ax.axhline(h, color=f"C{k}", linestyle="--", linewidth=1.0, label=f"hurdle {k}: {h:.3g}")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(plt, fig, output, ext)
    return output


def _save_figure(plt, fig, output: str, ext: str) -> None:
    """Lay out, write through a temporary file renamed over ``output``, close."""
    fig.tight_layout()
    tmp = f"{output}.tmp{ext}"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, output)


def _bench_rows(rows) -> List[dict]:
    """Rows of pynas bench: the dicts themselves, or read from a JSONL file (one row a line)."""
    if not isinstance(rows, (str, os.PathLike)):
        return list(rows)
    try:
        with open(rows, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"rows: no such file {rows!r} (rows of pynas bench, JSONL)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"rows: {rows} is not JSONL ({exc})") from None


def plot_roofline(rows, output: str) -> List[str]:
    """The roofline of measured ``pynas bench`` rows (``--benchmarks roofline``), as a PNG or SVG through matplotlib;
    returns the labels of the points drawn.

    Log-log: attainable GFLOP/s against arithmetic intensity (flop per byte). The compute roof is the last ok
    ``roofline_fma`` row's GFLOP/s, the bandwidth roof the last ok ``roofline_copy`` row's GB/s times the
    intensity. One point per ok kernel row with ``gflops`` and ``arithmetic_intensity`` both positive, at the roofs'
    thread count: the flops are the reference's convolutions and matrix products only (elementwise flops are not
    counted, so the elementwise mixed_sum rows count none and are left out). Where a row's bytes are not known
    (``traffic_estimated``), its intensity comes from an estimate, the tensors each of the reference's aten ops
    reads and writes, once each (pynas.bench.count_flops); those points are drawn hollow.

    rows: a sequence of row dicts, or the path of a JSONL file of them.
    """
    ext = os.path.splitext(output)[1].lower()
    if ext not in (".svg", ".png"):
        raise ValueError(f"output: expected a file name ending in .svg or .png, got {output!r}")
    rows = _bench_rows(rows)

    def roof(name):
        ok = [r for r in rows if r.get("benchmark") == name and r.get("status") == "ok"]
        if not ok:
            raise ValueError(f"rows: no ok {name} row (measure the roofs with: pynas bench --benchmarks roofline)")
        return ok[-1]

    fma, copy = roof("roofline_fma"), roof("roofline_copy")
    peak, bw = float(fma["gflops"]), float(copy["bandwidth_gbs"])
    points = [r for r in rows if r.get("status") == "ok" and not str(r.get("benchmark", "")).startswith("roofline")
              and (r.get("gflops") or 0) > 0 and (r.get("arithmetic_intensity") or 0) > 0
              and r.get("threads") == fma.get("threads")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("output: drawing the roofline needs matplotlib (pip install pynas[plot])") from None

    ridge = peak / bw  # flop/B where the two roofs meet
    xs_all = [ridge] + [float(r["arithmetic_intensity"]) for r in points]
    lo, hi = min(xs_all) / 8, max(xs_all) * 8
    n = 200
    xs = [lo * (hi / lo) ** (k / (n - 1)) for k in range(n)]
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ax.plot(xs, [min(peak, bw * x) for x in xs], color="black", linewidth=1.5)
    ax.text(hi / 1.5, peak * 1.1, f"FMA peak {peak:.1f} GFLOP/s", ha="right", va="bottom", fontsize=8)
    x_label = max(lo * 2, min(ridge / 4, hi))
    ax.text(x_label, bw * x_label * 1.5, f"copy {bw:.1f} GB/s", ha="right", va="bottom", fontsize=8)
    providers = sorted({r.get("provider", "") for r in points})
    markers = "osD^v<>"
    labels = []
    for k, prov in enumerate(providers):
        for estimated in (False, True):
            sel = [r for r in points if r.get("provider", "") == prov and bool(r.get("traffic_estimated")) == estimated]
            if not sel:
                continue
            ax.scatter([r["arithmetic_intensity"] for r in sel], [r["gflops"] for r in sel], s=30, zorder=3,
                       marker=markers[k % len(markers)], edgecolors=f"C{k}",
                       facecolors="none" if estimated else f"C{k}",
                       label=f"{prov}{' (bytes estimated)' if estimated else ''}")
            for r in sel:
                ax.annotate(r["benchmark"], (r["arithmetic_intensity"], r["gflops"]), fontsize=6,
                            xytext=(4, 3), textcoords="offset points")
                labels.append(f"{r['benchmark']} / {prov}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(top=peak * 2)
    ax.set_xlabel("arithmetic intensity (flop / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"roofline: {fma.get('device', '')}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if points:
        ax.legend(fontsize=7, loc="lower right")
    _save_figure(plt, fig, output, ext)
    return labels
