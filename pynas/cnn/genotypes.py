"""CNN genotypes: derivation from alphas, and JSON in and out."""
from __future__ import annotations

import json
from collections import namedtuple
from typing import List, Sequence, Tuple

import torch

from .operations import PRIMITIVES

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


def parse_cell(probs: torch.Tensor, steps: int, primitives: Sequence[str] = PRIMITIVES) -> List[Tuple[str, int]]:
    """Derive one cell's genes from its softmaxed alphas (shape (edges, ops)).

    For each node keep the 2 incoming edges with the largest non-'none' weight,
    and on each kept edge the argmax over the non-'none' candidates. Ties keep
    the earlier index, as the reference code does.
    """
    W = probs.detach().to("cpu", torch.float64).tolist()
    none = primitives.index("none") if "none" in primitives else -1
    gene: List[Tuple[str, int]] = []
    start, n = 0, 2
    for _ in range(steps):
        rows = W[start:start + n]
        best = [max(w for k, w in enumerate(row) if k != none) for row in rows]
        edges = sorted(range(n), key=lambda j: -best[j])[:2]
        for j in edges:
            k_best = None
            for k, w in enumerate(rows[j]):
                if k != none and (k_best is None or w > rows[j][k_best]):
                    k_best = k
            gene.append((primitives[k_best], j))
        start += n
        n += 1
    return gene


def derive(alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor, steps: int = 4, multiplier: int = 4,
           primitives: Sequence[str] = PRIMITIVES) -> Genotype:
    """The genotype of a search network from its two arch tensors."""
    normal = parse_cell(torch.softmax(alphas_normal.detach(), dim=-1), steps, primitives)
    reduce = parse_cell(torch.softmax(alphas_reduce.detach(), dim=-1), steps, primitives)
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=normal, normal_concat=concat, reduce=reduce, reduce_concat=list(concat))


def to_json(genotype: Genotype) -> str:
    return json.dumps({
        "normal": [[op, int(j)] for op, j in genotype.normal],
        "normal_concat": [int(i) for i in genotype.normal_concat],
        "reduce": [[op, int(j)] for op, j in genotype.reduce],
        "reduce_concat": [int(i) for i in genotype.reduce_concat],
    })


def from_json(text: str) -> Genotype:
    """Parse :func:`to_json`'s output (a JSON string or an already-decoded dict)."""
    data = json.loads(text) if isinstance(text, (str, bytes)) else text
    if not isinstance(data, dict):
        raise ValueError("text: expected a JSON object with keys normal, normal_concat, reduce, reduce_concat")
    missing = [k for k in Genotype._fields if k not in data]
    if missing:
        raise ValueError(f"text: genotype JSON lacks {', '.join(missing)}")

    def genes(key):
        out = []
        for item in data[key]:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"text: {key} entries must be [op, input] pairs, got {item!r}")
            out.append((item[0], int(item[1])))
        return out

    return Genotype(normal=genes("normal"), normal_concat=[int(i) for i in data["normal_concat"]],
                    reduce=genes("reduce"), reduce_concat=[int(i) for i in data["reduce_concat"]])
