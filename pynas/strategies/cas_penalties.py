"""The weight penalties of continual architecture search (CAS, Pasunuru and Bansal, ACL 2019), with the semantics
of its code (``trainer.py`` of ramakanth-pasunuru/CAS-MAS: ``get_block_sparse_regularization`` and
``get_condition2_regularization``).

For a tensor, *its matrix* is the tensor itself when 2-D and, when it has more dimensions, the tensor reshaped to
``(size(0), numel / size(0))`` (every dimension after the first flattened); a 0-d or 1-D tensor is a *vector* (a
0-d one of one element). Rows are along the first dimension: for an ``nn.Linear`` weight (out, in) a row is an
output unit; for the DARTS RNN cell's ``_W0`` and ``_Ws.i`` (stored (in, out), used as ``x @ W``) a row is an input
unit; for an embedding, a word.

* ``block_sparsity(params) = sum over matrices W of sum over rows ||W_row||_2 + sum over vectors v of ||v||_1``
  (the group lasso with one group per row).
* ``orthogonality(params, previous) = sum over matrices ||(W - W_1)^T W_1||_F + sum over vectors
  ||(v - v_1) * v_1||_2`` (Frobenius and Euclidean norms, not squared; ``*`` element-wise), ``W_1``, ``v_1`` the
  previous task's values, constants.

Task 1 of CAS trains with ``lambda_bs * block_sparsity(theta)`` (:func:`first_task_penalty`; the code's default
``lambda_bs`` is 1e-7). A later task starts from the previous task's weights ``theta_1``, keeps a frozen copy and
trains with ``lambda_bs * block_sparsity(theta - theta_1) + lambda_o * orthogonality(theta, theta_1)``
(:class:`ContinualPenalty`; 1e-3 and 1e-3 in the README's example), over the parameters that
:func:`cas_selection` names: all but the weights of the edges that the previous task's cell does not use.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

#: Defaults: the code's ``--block_sparse_reg_lambda`` (task 1), and the README's CAS step-2 example (later tasks).
FIRST_TASK_LAMBDA_BS = 1e-7
LATER_TASK_LAMBDA_BS = 1e-3
LATER_TASK_LAMBDA_O = 1e-3

#: The edge and shared-weight name patterns of pynas's DARTS RNN evaluation cell (pynas/rnn/model_eval.py): node
#: i's weight ``rnns.0._Ws.{i}`` is its incoming edge's; ``rnns.0._W0`` (the input and s0) is shared.
DARTS_EDGE_PATTERNS = ("_Ws.{}",)
DARTS_SHARED_PATTERNS = ("_W0",)

Selection = Union[None, Callable[[str], bool], Collection[str]]


def _tensor_list(arg: str, params: object) -> List[torch.Tensor]:
    if isinstance(params, torch.Tensor) or isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise ValueError(f"{arg}: expected an iterable of tensors, got {type(params).__name__}")
    tensors = list(params)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{arg}: expected tensors, got {type(t).__name__} at position {i}")
        if not t.is_floating_point():
            raise ValueError(f"{arg}: expected floating-point tensors, got {t.dtype} at position {i}")
    return tensors


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """The tensor's matrix (module docstring): 2-D as is, more dimensions flattened after the first."""
    if t.dim() == 2:
        return t
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _block_term(t: torch.Tensor) -> torch.Tensor:
    if t.dim() >= 2:
        return torch.linalg.vector_norm(_matrix(t), ord=2, dim=1).sum()
    return t.abs().sum()


def _ortho_term(p: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
    if p.dim() >= 2:
        w, w1 = _matrix(p), _matrix(p1)
        return torch.linalg.vector_norm((w - w1).transpose(0, 1) @ w1)  # Frobenius norm
    return torch.linalg.vector_norm((p - p1) * p1)


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    total: Optional[torch.Tensor] = None
    for term in terms:
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


def block_sparsity(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum over matrices W of sum over rows ||W_row||_2 + sum over vectors v of ||v||_1`` (module docstring):
    ``W.norm(p=2, dim=1).sum()`` for a 2-D tensor, every dimension after the first flattened for more, ``|v|.sum()``
    for a 0-d or 1-D one. A 0-d tensor, differentiable in ``params``; 0 (float32) for no tensors, 0 for tensors of
    no element. The gradient of a zero row or entry is 0."""
    return _total(_block_term(t) for t in _tensor_list("params", params))


def orthogonality(params: Iterable[torch.Tensor], previous: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum over matrices ||(W - W_1)^T W_1||_F + sum over vectors ||(v - v_1) * v_1||_2`` (module docstring),
    ``previous[k]`` the ``W_1`` / ``v_1`` of ``params[k]`` (same shape), taken as a constant (detached): a 0-d
    tensor, differentiable in ``params`` only. 0 (float32) for no tensors; the gradient is 0 where a term is 0."""
    ps = _tensor_list("params", params)
    prev = _tensor_list("previous", previous)
    if len(prev) != len(ps):
        raise ValueError(f"previous: expected as many tensors as params ({len(ps)}), got {len(prev)}")
    for i, (p, q) in enumerate(zip(ps, prev)):
        if p.shape != q.shape:
            raise ValueError(f"previous: expected shape {tuple(p.shape)} (that of params[{i}]) at position {i}, "
                             f"got {tuple(q.shape)}")
    return _total(_ortho_term(p, q.detach()) for p, q in zip(ps, prev))


def _check_lambda(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _selected(model: object, select: Selection) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of the model's parameters that ``select`` picks, each parameter once (a tied one under its
    first name, picked when any of its names is), in ``named_parameters`` order."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    aliases: Dict[int, List[str]] = {}
    params: Dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    all_names = [n for names in aliases.values() for n in names]
    if select is None:
        pick: Callable[[str], bool] = lambda name: True  # noqa: E731
    elif callable(select):
        pick = select
    elif isinstance(select, Collection) and not isinstance(select, (str, bytes)):
        wanted = set(select)
        unknown = sorted(str(n) for n in wanted - set(all_names))
        if unknown:
            raise ValueError(f"select: expected names of the model's parameters, got {unknown[:5]} "
                             f"(the model has {all_names[:5]}{' ...' if len(all_names) > 5 else ''})")
        pick = wanted.__contains__
    else:
        raise ValueError(f"select: expected None, a function name -> bool or a collection of parameter names, got "
                         f"{type(select).__name__}")
    chosen = []
    for key, names in aliases.items():
        hits = [bool(pick(n)) for n in names]
        if any(hits):
            chosen.append((names[0], params[key]))
    if not chosen:
        raise ValueError(f"select: picked none of the model's {len(all_names)} parameters")
    return chosen


def _check_transpose(transpose: object) -> frozenset:
    if isinstance(transpose, (str, bytes)) or not isinstance(transpose, Collection) \
            or not all(isinstance(n, str) for n in transpose):
        raise ValueError(f"transpose: expected a collection of parameter names, got {transpose!r}")
    return frozenset(transpose)


def _oriented(name: str, t: torch.Tensor, transpose: frozenset) -> torch.Tensor:
    return t.t() if name in transpose and t.dim() == 2 else t


def cell_weight_names(model: nn.Module) -> List[str]:
    """The names of the DARTS RNN cell's weights in ``model`` (``_W0``, ``_Ws.i``): stored (in, out) and used as
    ``x @ W``, so CAS's rows (output units, as for the code's ``nn.Linear`` weights) are their columns; pass these
    names as ``transpose``."""
    rx = [_pattern_regex("patterns", q, False) for q in DARTS_SHARED_PATTERNS] + \
        [_pattern_regex("patterns", q, True) for q in DARTS_EDGE_PATTERNS]
    return [n for n, _ in model.named_parameters() if any(r.search(n) for r in rx)]


def first_task_penalty(model: nn.Module, lambda_bs: float = FIRST_TASK_LAMBDA_BS,
                       select: Selection = None, transpose: Collection[str] = ()) -> torch.Tensor:
    """CAS's task-1 penalty ``lambda_bs * block_sparsity(theta)``, ``theta`` the parameters of ``model`` that
    ``select`` picks (None: all; a function ``name -> bool``; or a collection of names), each once (tied ones too);
    the 2-D ones named in ``transpose`` enter transposed (their columns are the groups). A 0-d tensor,
    differentiable in ``theta``."""
    lambda_bs = _check_lambda("lambda_bs", lambda_bs)
    transpose = _check_transpose(transpose)
    return lambda_bs * block_sparsity(_oriented(n, p, transpose) for n, p in _selected(model, select))


class ContinualPenalty:
    """CAS's penalty for a later task: ``lambda_bs * block_sparsity(theta - theta_1) + lambda_o *
    orthogonality(theta, theta_1)``.

    ``theta``: the parameters of ``model`` that ``select`` picks (None: all; a function ``name -> bool``, e.g. from
    :func:`cas_selection`; or a collection of names), each once (a tied parameter under its first name);
    the 2-D ones named in ``transpose`` enter transposed (rows are their columns), in both terms;
    ``theta_1``: a detached copy of them taken at construction, i.e. the previous task's weights when built before
    the new task trains. The copy never changes (training moves ``theta`` only); it follows ``theta``'s device and
    dtype if the model is moved. ``names`` lists the penalised parameters, ``previous`` maps them to the copy.
    Calling returns the penalty, a 0-d tensor differentiable in ``theta`` only.
    """

    def __init__(self, model: nn.Module, lambda_bs: float = LATER_TASK_LAMBDA_BS,
                 lambda_o: float = LATER_TASK_LAMBDA_O, select: Selection = None, transpose: Collection[str] = ()):
        self.lambda_bs = _check_lambda("lambda_bs", lambda_bs)
        self.lambda_o = _check_lambda("lambda_o", lambda_o)
        self.transpose = _check_transpose(transpose)
        chosen = _selected(model, select)
        self.names: Tuple[str, ...] = tuple(n for n, _ in chosen)
        self._params: Tuple[nn.Parameter, ...] = tuple(p for _, p in chosen)
        self.previous: Dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in chosen}

    def _pairs(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        prev = []
        for name, p in zip(self.names, self._params):
            q = self.previous[name]
            if q.shape != p.shape:
                raise RuntimeError(f"ContinualPenalty: parameter {name} changed shape from {tuple(q.shape)} to "
                                   f"{tuple(p.shape)} since the copy was taken")
            if q.device != p.device or q.dtype != p.dtype:
                q = self.previous[name] = q.to(device=p.device, dtype=p.dtype)
            prev.append(_oriented(name, q, self.transpose))
        return [_oriented(n, p, self.transpose) for n, p in zip(self.names, self._params)], prev

    def terms(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The unweighted ``(block_sparsity(theta - theta_1), orthogonality(theta, theta_1))``."""
        params, prev = self._pairs()
        return block_sparsity(p - q for p, q in zip(params, prev)), orthogonality(params, prev)

    def __call__(self) -> torch.Tensor:
        bs, ortho = self.terms()
        return self.lambda_bs * bs + self.lambda_o * ortho

    def __repr__(self) -> str:
        return (f"ContinualPenalty({len(self.names)} parameters, lambda_bs={self.lambda_bs:g}, "
                f"lambda_o={self.lambda_o:g})")


def _pattern_regex(arg: str, pattern: object, with_index: bool) -> "re.Pattern[str]":
    """A name pattern as a regex: its parts a run of dot-separated parts (``{}``: one part of decimal digits)."""
    ok = isinstance(pattern, str) and pattern != ""
    if ok:
        pieces = pattern.split("{}")
        ok = len(pieces) == 1 + int(with_index) and not any("{" in q or "}" in q for q in pieces)
    if not ok:
        what = "one '{}' for the edge index" if with_index else "no '{}'"
        raise ValueError(f"{arg}: expected non-empty strings with {what}, got {pattern!r}")
    body = r"(\d+)".join(re.escape(q) for q in pieces)
    return re.compile(r"(?<![^.])" + body + r"(?![^.])")


def _patterns(arg: str, patterns: object, with_index: bool) -> List["re.Pattern[str]"]:
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise ValueError(f"{arg}: expected a sequence of strings, got {type(patterns).__name__}")
    return [_pattern_regex(arg, p, with_index) for p in patterns]


def cas_selection(names: Iterable[str], used_edges: Iterable[int], *,
                  edge_patterns: Sequence[str] = DARTS_EDGE_PATTERNS,
                  shared_patterns: Sequence[str] = DARTS_SHARED_PATTERNS) -> List[str]:
    """The names, among ``names`` (order kept), of the parameters that CAS's condition 2 penalises.

    A name is picked when it matches a shared pattern (the input / cell weights that every cell uses), or an edge
    pattern with an index in ``used_edges`` (the edges the previous task's cell uses), or no edge pattern at all:
    every parameter but the weights of the unused edges. A pattern matches a name when its dot-separated parts are
    a run of the name's parts; in an edge pattern ``{}`` stands for one part that is a decimal index, matched
    exactly (``_Ws.{}`` with edge 1 matches ``rnns.0._Ws.1`` and ``_Ws.1.bias``, never ``_Ws.10``; the code's
    substring test ``'_w_h.' + str(node) in name`` would). Unlike the code, a name matching both kinds is listed
    once.

    Defaults: pynas's DARTS RNN evaluation cell (:data:`DARTS_EDGE_PATTERNS`, :data:`DARTS_SHARED_PATTERNS`).
    There node i's weight ``rnns.0._Ws.{i}`` is its single incoming edge's, whatever the predecessor, so every
    cell uses every node's weight: with ``used_edges = range(len(genotype.recurrent))`` the selection is every
    parameter of the model.
    """
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ValueError(f"names: expected an iterable of parameter names, got {type(names).__name__}")
    names = list(names)
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise ValueError(f"names: expected strings, got {type(n).__name__} at position {i}")
    if isinstance(used_edges, (str, bytes)) or not isinstance(used_edges, Iterable):
        raise ValueError(f"used_edges: expected an iterable of edge indices, got {type(used_edges).__name__}")
    used = set()
    for e in used_edges:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(f"used_edges: expected integers >= 0, got {e!r}")
        used.add(e)
    edges = _patterns("edge_patterns", edge_patterns, with_index=True)
    shared = _patterns("shared_patterns", shared_patterns, with_index=False)
    picked = []
    for name in names:
        if any(rx.search(name) for rx in shared):
            picked.append(name)
            continue
        indices = [int(m.group(1)) for rx in edges for m in rx.finditer(name)]
        if not indices or any(i in used for i in indices):
            picked.append(name)
    return picked

