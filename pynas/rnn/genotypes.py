"""The DARTS RNN search space's names, genotype derivation and JSON (docs/darts.md, "RNN space" and
"Deriving a genotype")."""
from __future__ import annotations

import json
from collections import namedtuple
from typing import List, Sequence, Tuple

import torch

Genotype = namedtuple("Genotype", "recurrent concat")

#: Candidates in alpha-column order.
PRIMITIVES = ["none", "tanh", "relu", "sigmoid", "identity"]
#: Nodes per cell; the cell's output is the mean of the last CONCAT nodes.
STEPS = 8
CONCAT = 8


def parse_recurrent(probs: torch.Tensor, steps: int = STEPS,
                    primitives: Sequence[str] = PRIMITIVES, forbid_s0: bool = False) -> List[Tuple[str, int]]:
    """The genes of a cell from its softmaxed arch weights (shape (edges, ops)).

    Node i (0-based) has i + 1 incoming edges; keep the one whose best non-'none' weight is largest and
    on it the argmax over the non-'none' candidates. Ties keep the earlier index, as the reference does.
    With ``forbid_s0`` a node after the first whose best input is s0 takes its second-ranked input (I-DARTS's
    rule, pynas.strategies.idarts).
    """
    W = probs.detach().to("cpu", torch.float64).tolist()
    expected = steps * (steps + 1) // 2
    if len(W) != expected or any(len(row) != len(primitives) for row in W):
        raise ValueError(f"probs: expected shape ({expected}, {len(primitives)}), got {tuple(probs.shape)}")
    none = primitives.index("none") if "none" in primitives else -1
    gene: List[Tuple[str, int]] = []
    start = 0
    for i in range(steps):
        rows = W[start:start + i + 1]
        best = [max(w for k, w in enumerate(row) if k != none) for row in rows]
        ranked = sorted(range(i + 1), key=lambda e: -best[e])
        j = ranked[1] if forbid_s0 and i > 0 and ranked[0] == 0 else ranked[0]
        k_best = None
        for k, w in enumerate(rows[j]):
            if k != none and (k_best is None or w > rows[j][k_best]):
                k_best = k
        gene.append((primitives[k_best], j))
        start += i + 1
    return gene


def derive(weights: torch.Tensor, steps: int = STEPS, concat: int = CONCAT) -> Genotype:
    """The genotype of an RNN search model from its arch tensor (36 x 5 for 8 steps)."""
    gene = parse_recurrent(torch.softmax(weights.detach(), dim=-1), steps)
    return Genotype(recurrent=gene, concat=list(range(steps + 1))[-concat:])


def to_json(genotype: Genotype) -> str:
    """The genotype as JSON; an ESS genotype (pynas.strategies.ess) adds its ``inter`` part."""
    data = {"recurrent": [[op, int(j)] for op, j in genotype.recurrent], "concat": [int(i) for i in genotype.concat]}
    if getattr(genotype, "inter", None) is not None:
        from ..strategies.ess import inter_to_dict

        data["inter"] = inter_to_dict(genotype.inter)
    return json.dumps(data)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def from_json(text) -> Genotype:
    """Parse :func:`to_json`'s output (a JSON string or an already-decoded dict).

    Node i (0-based) may take a state j with 0 <= j <= i; concat holds node indices in [0, len(recurrent)]. With
    an ``inter`` key, the ESS genotype (:func:`pynas.strategies.ess.with_inter`)."""
    data = json.loads(text) if isinstance(text, (str, bytes)) else text
    if not isinstance(data, dict) or "recurrent" not in data or "concat" not in data:
        raise ValueError("text: expected a JSON object with keys recurrent and concat")
    rec, concat = data["recurrent"], data["concat"]
    if not isinstance(rec, list) or not rec:
        raise ValueError(f"text: recurrent must be a non-empty list of [op, input] pairs, got {rec!r}")
    genes = []
    for i, item in enumerate(rec):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"text: recurrent entries must be [op, input] pairs, got {item!r}")
        op, j = item
        if op not in PRIMITIVES or op == "none":
            raise ValueError(f"text: unknown recurrent op {op!r}")
        if not _is_int(j) or not 0 <= j <= i:
            raise ValueError(f"text: node {i} can take a state 0..{i}, got input {j!r}")
        genes.append((op, j))
    if not isinstance(concat, list) or not concat or not all(_is_int(c) and 0 <= c <= len(genes) for c in concat):
        raise ValueError(f"text: concat must be a non-empty list of node indices 0..{len(genes)}, got {concat!r}")
    if "inter" in data:  # ESS: the inter-cell DAGs that make the cell's inputs
        from ..strategies.ess import with_inter

        return with_inter(Genotype(recurrent=genes, concat=list(concat)), data["inter"])
    return Genotype(recurrent=genes, concat=list(concat))


# The recurrent cells the DARTS paper reports: V1 from the first-order search, V2 from the second-order one (the
# 55.7 PTB perplexity cell). "DARTS" names V2, as the original code does.
DARTS_V1 = Genotype(recurrent=[("relu", 0), ("relu", 1), ("tanh", 2), ("relu", 3), ("relu", 4), ("identity", 1),
                               ("relu", 5), ("relu", 1)], concat=list(range(1, 9)))
DARTS_V2 = Genotype(recurrent=[("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1), ("tanh", 2),
                               ("sigmoid", 5), ("tanh", 3), ("relu", 5)], concat=list(range(1, 9)))
PUBLISHED = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2}


def load_genotype(source: str) -> Genotype:
    """A published cell by name (:data:`PUBLISHED`) or a genotype JSON file (as a search writes it)."""
    from .._genotype_files import load_named_or_file

    return load_named_or_file(source, PUBLISHED, from_json)
