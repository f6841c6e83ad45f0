"""CNN genotypes: derivation from alphas, and JSON in and out."""
from __future__ import annotations

import json
from collections import namedtuple
from typing import List, Sequence, Tuple

import torch

from .operations import OPS, PRIMITIVES

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


def parse_cell_pairs(probs: torch.Tensor, steps: int, primitives: Sequence[str] = PRIMITIVES,
                     distinct_inputs: bool = False) -> List[Tuple[str, int]]:
    """One cell's genes ranking every (edge, candidate) pair entering a node together: per node the 2 pairs with
    the largest weight, 'none' excluded; two candidates on the same input may both be kept unless
    ``distinct_inputs`` (then the second is the best pair on another input). The rule of GDAS's DARTS-space code
    and of I-DARTS on the CNN space (docs/methods.md, "Genotype rules"). Ties keep the earlier edge,
    then the earlier candidate."""
    W = probs.detach().to("cpu", torch.float64).tolist()
    expected = sum(2 + i for i in range(steps))
    if len(W) != expected or any(len(row) != len(primitives) for row in W):
        raise ValueError(f"probs: expected shape ({expected}, {len(primitives)}), got {tuple(probs.shape)}")
    gene: List[Tuple[str, int]] = []
    start = 0
    for i in range(steps):
        n = 2 + i
        pairs = sorted(((-W[start + j][k], j, k) for j in range(n) for k, name in enumerate(primitives)
                        if name != "none"))
        first = pairs[0]
        second = next(p for p in pairs[1:] if not distinct_inputs or p[1] != first[1])
        for _, j, k in (first, second):
            gene.append((primitives[k], j))
        start += n
    return gene


def derive(alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor, steps: int = 4, multiplier: int = 4,
           primitives: Sequence[str] = PRIMITIVES) -> Genotype:
    """The genotype of a search network from its two arch tensors."""
    normal = parse_cell(torch.softmax(alphas_normal.detach(), dim=-1), steps, primitives)
    reduce = parse_cell(torch.softmax(alphas_reduce.detach(), dim=-1), steps, primitives)
    return cells(normal, reduce, steps, multiplier)


def cells(normal: List[Tuple[str, int]], reduce: List[Tuple[str, int]], steps: int = 4,
          multiplier: int = 4) -> Genotype:
    """The genotype of two cells' genes, each concatenating its last ``multiplier`` nodes."""
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=normal, normal_concat=concat, reduce=reduce, reduce_concat=list(concat))


def to_json(genotype: Genotype) -> str:
    return json.dumps({
        "normal": [[op, int(j)] for op, j in genotype.normal],
        "normal_concat": [int(i) for i in genotype.normal_concat],
        "reduce": [[op, int(j)] for op, j in genotype.reduce],
        "reduce_concat": [int(i) for i in genotype.reduce_concat],
    })


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def from_json(text: str) -> Genotype:
    """Parse :func:`to_json`'s output (a JSON string or an already-decoded dict).

    Each cell lists two [op, input] genes per node; node i (0-based) takes a state 0..i + 1 (the two cell
    inputs, then the earlier nodes); the concat lists hold state indices."""
    data = json.loads(text) if isinstance(text, (str, bytes)) else text
    if not isinstance(data, dict):
        raise ValueError("text: expected a JSON object with keys normal, normal_concat, reduce, reduce_concat")
    missing = [k for k in Genotype._fields if k not in data]
    if missing:
        raise ValueError(f"text: genotype JSON lacks {', '.join(missing)}")

    def genes(key):
        items = data[key]
        if not isinstance(items, list) or not items or len(items) % 2:
            raise ValueError(f"text: {key} must be a non-empty list of [op, input] pairs, two per node, got {items!r}")
        out = []
        for e, item in enumerate(items):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"text: {key} entries must be [op, input] pairs, got {item!r}")
            if item[0] not in OPS:  # 'none' included: a zero input (random search samples it)
                raise ValueError(f"text: unknown {key} op {item[0]!r}")
            node = e // 2
            if not _is_int(item[1]) or not 0 <= item[1] <= node + 1:
                raise ValueError(f"text: {key} node {node} can take a state 0..{node + 1}, got input {item[1]!r}")
            out.append((item[0], item[1]))
        return out

    def concat(key, n_states):
        items = data[key]
        if not isinstance(items, list) or not items or not all(_is_int(i) and 0 <= i < n_states for i in items):
            raise ValueError(f"text: {key} must be a non-empty list of state indices 0..{n_states - 1}, got {items!r}")
        return list(items)

    normal, reduce = genes("normal"), genes("reduce")
    return Genotype(normal=normal, normal_concat=concat("normal_concat", 2 + len(normal) // 2),
                    reduce=reduce, reduce_concat=concat("reduce_concat", 2 + len(reduce) // 2))


# The cells the DARTS paper reports (its Figures 4 and 5), as data: V1 from the first-order search, V2 from the
# second-order one (the 2.76 % CIFAR-10 cell). "DARTS" names V2, as the original code does.
DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5])
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5])
PUBLISHED = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2}


def load_genotype(source: str) -> Genotype:
    """A published cell by name (:data:`PUBLISHED`) or a genotype JSON file (as a search writes it)."""
    from .._genotype_files import load_named_or_file

    return load_named_or_file(source, PUBLISHED, from_json)
