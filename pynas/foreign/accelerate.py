"""``accelerate(model)``: pynas's fused edge under another codebase's DARTS supernet, proven equal before it runs.

1. **Find** the mixed ops: a module with a ``ModuleList`` or ``ModuleDict`` child of two or more candidates at
   least one of which is a pool or a conv chain of :mod:`pynas.foreign.recognise` (so a cell's list of mixed
   ops is not one). Its weights come in as the forward's second argument (``forward(x, weights)``, the
   original code's form), or, for a ``forward(x)``, from a tensor of one entry per candidate that the layer
   holds itself (its alpha, ``softmax(alpha)``).
2. **Probe**: the mixed op's first input, captured from one forward of the model on ``example_inputs``
   (state and random number generators restored afterwards) or, without them, from the model's first real
   forward; cut to two samples and at most 8x8 pixels (the parity kept).
3. **Prove** on two float64 CPU copies of the mixed op, for a dense and a sparse (some weights exactly 0)
   random weighting: the fused path (forced onto the C++ kernels) against the module's own forward, on the
   output, the gradients of the input, the weights (or the layer's alpha) and every parameter, and the
   BatchNorm running statistics. Two forms are tried: the weighted sum ``sum_k w_k op_k(x)``, and PC-DARTS's
   partial-channel edge (the candidates on the first C/K channels, the rest bypassed, max-pooled on a
   stride-2 edge, channel-shuffled) when the candidates have fewer channels than the input. Then the same at
   the model's own dtype and device through the implementation the backend in force picks (when one does),
   for the dense weighting.
4. **Switch**: the mixed op's ``forward`` becomes pynas's (an instance attribute; the class, parameters,
   buffers, state_dict, optimizers and the mixed op's own hooks are untouched). Each call still runs the
   module's own forward where the fused path does not apply: eval mode, autocast, a torch.func transform,
   other arguments or shapes than the probe's, hooks on its candidates, no fused implementation for the
   tensors under the backend in force.

Nothing is switched that the numbers do not confirm: a candidate pynas does not know, an affine BatchNorm, a
forward that does more than the weighted sum (an extra per-edge factor, a branch on the weights' values) all
stay the module's own, with the reason in the report.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import _autodiff
from ..ops import cnn_edge
from ..ops.partial_channel import partial_channel
from .recognise import Candidate, ForeignPlan, classify

__all__ = ["accelerate", "deaccelerate", "accelerated", "AccelerationReport", "MixedOpVerdict"]

_STATE = "_pynas_accel"
_CONV_KINDS = ("max", "avg", "sep", "dil", "fr")
_PROBE_BATCH = 2
_PROBE_PIXELS = 8
_TOL = {torch.float64: 1e-8, torch.float32: 2e-4}


@dataclass
class MixedOpVerdict:
    """What :func:`accelerate` made of one mixed op."""

    path: str  # its name in the model
    cls: str  # its class's name
    weights: str  # 'argument' (forward(x, weights)) or 'own <attr>' (a layer holding its alpha)
    candidates: List[Tuple[str, str, str]] = field(default_factory=list)  # (key, class, DARTS name or '?')
    accelerated: bool = False
    pending: bool = False  # waiting for the first forward (no example_inputs)
    reason: Optional[str] = None  # why not accelerated
    form: Optional[str] = None  # 'weighted sum' or 'partial channels K=4'
    error: Optional[float] = None  # the largest relative difference found by the float64 check
    runs_on: Optional[str] = None  # the backend that took the probe at the model's dtype and device
    note: Optional[str] = None  # e.g. why no backend took it at the model's dtype and device

    def line(self) -> str:
        names = ", ".join(n for _, _, n in self.candidates)
        if self.pending:
            head = "pending (checked at the first forward)"
        elif self.accelerated:
            check = f"float64 check {self.error:.1e}" if self.error is not None else "unchecked"
            where = f"runs on {self.runs_on}" if self.runs_on else self.note
            head = f"accelerated ({self.form}; {check}; {where})"
        else:
            head = f"left alone: {self.reason}"
        return f"{self.path or '<model>'} [{self.cls}, weights {self.weights}; {names}]: {head}"


class AccelerationReport:
    """Every mixed op :func:`accelerate` found, as :class:`MixedOpVerdict` (``entries``), printable."""

    def __init__(self, model: nn.Module, entries: List[MixedOpVerdict]):
        self.model = model
        self.entries = entries

    @property
    def accelerated(self) -> List[MixedOpVerdict]:
        return [e for e in self.entries if e.accelerated]

    @property
    def left_alone(self) -> List[MixedOpVerdict]:
        return [e for e in self.entries if not e.accelerated and not e.pending]

    @property
    def pending(self) -> List[MixedOpVerdict]:
        return [e for e in self.entries if e.pending]

    def summary(self) -> str:
        s = f"{len(self.accelerated)} of {len(self.entries)} mixed ops accelerated"
        if self.pending:
            s += f", {len(self.pending)} pending until the first forward"
        return s

    def __str__(self) -> str:
        return "\n".join([self.summary()] + ["  " + e.line() for e in self.entries])

    def __repr__(self) -> str:
        return f"<AccelerationReport: {self.summary()}>"

    def restore(self) -> None:
        """:func:`deaccelerate` the model."""
        deaccelerate(self.model)


# ---- finding ------------------------------------------------------------------------------------------------


class _Found:
    """A mixed op as found: the name of its candidate container, how it gets its weights, its verdict."""

    def __init__(self, path: str, module: nn.Module, container_name: str, weights_arg: bool, verify: bool):
        self.path = path
        self.container_name = container_name
        container = module._modules[container_name]
        self.keys = list(container.keys()) if isinstance(container, nn.ModuleDict) else \
            [str(i) for i in range(len(container))]
        self.weights_arg = weights_arg
        self.verify = verify
        self.verdict = MixedOpVerdict(path, type(module).__name__, "argument" if weights_arg else "own")

    def items(self, module: nn.Module) -> List[nn.Module]:
        """The candidates of ``module`` (the mixed op or a copy of it), in weight-column order."""
        c = module._modules[self.container_name]
        return list(c.values()) if isinstance(c, nn.ModuleDict) else list(c)


def _takes_weights(module: nn.Module) -> bool:
    """Whether the forward takes the weights (a second positional parameter) or not (``forward(x)``)."""
    try:
        ps = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in ps):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in ps) >= 2


def find_mixed_ops(model: nn.Module, verify: bool = True) -> List[Tuple[nn.Module, _Found]]:
    """Every mixed op of the model (see the module docstring), in ``named_modules`` order; pynas's own
    :class:`pynas.cnn.MixedOp` (fused already) is passed over."""
    from ..cnn.model_search import MixedOp

    out = []
    for path, m in model.named_modules():
        if isinstance(m, MixedOp):
            continue
        for name, child in m.named_children():
            if not isinstance(child, (nn.ModuleList, nn.ModuleDict)) or len(child) < 2:
                continue
            items = list(child.values()) if isinstance(child, nn.ModuleDict) else list(child)
            if any(classify(i, str(i), op).kind in _CONV_KINDS for i, op in enumerate(items)):
                out.append((m, _Found(path, m, name, _takes_weights(m), verify)))
                break
    return out


# ---- the accelerated forward --------------------------------------------------------------------------------


class _Accel:
    """A mixed op's state while :func:`accelerate` holds it (kept on the module as ``_pynas_accel``): the plan,
    the proven form, and the instance forward it replaced (None: the class's)."""

    def __init__(self, found: _Found, original: Optional[Callable]):
        self.found = found
        self.original = original
        self.n = len(found.keys)  # weight columns
        self.kinds: List[Tuple[Optional[str], Optional[int]]] = []  # per candidate (kind, stride), as recognised
        self.plan: Optional[ForeignPlan] = None
        self.alpha: Optional[str] = None  # the attribute holding the layer's own alpha
        self.groups = 1  # partial channels K (1: a plain weighted sum)
        self.channels = 0  # the input's channel count
        self.stride = 1
        self.even = False  # the input needs an even height and width (stride-2 FR or partial channels)
        self.watch: List[nn.Module] = []  # the candidates' modules: hooks on any send a call to the module's forward

    def bind(self, module: nn.Module) -> "_Accel":
        """The same state over ``module`` (a copy of the mixed op): the plan reads the copy's tensors."""
        other = copy.copy(self)
        other.original = None
        cands = [classify(i, k, op) for i, (k, op) in enumerate(zip(self.found.keys, self.found.items(module)))]
        for c, (kind, stride) in zip(cands, self.kinds):
            c.kind, c.stride = kind, stride
        other.plan = ForeignPlan(cands, self.stride)
        other.watch = [m for c in cands for m in c.module.modules()]
        return other

    def own_forward(self, module: nn.Module) -> Callable:
        return self.original if self.original is not None else types.MethodType(type(module).forward, module)


def _has_hooks(mods: Sequence[nn.Module]) -> bool:
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks \
            or getattr(g, "_global_backward_pre_hooks", None):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in mods)


def _fused_call(st: _Accel, x: torch.Tensor, w: torch.Tensor,
                backend: Optional[str] = None) -> Optional[torch.Tensor]:
    """The mixed op's output through the fused kernels, or None where they do not apply to this call. ``w``: the
    weights, or the layer's own alpha (softmaxed here). Metadata checks only: no host sync."""
    if x.dim() != 4 or x.shape[1] != st.channels or (st.even and (x.shape[2] % 2 or x.shape[3] % 2)):
        return None
    if w.numel() != st.n or not w.is_floating_point() or w.device != x.device or (st.alpha is None and w.dim() != 1):
        return None
    params = st.plan.params()
    if params and (params[0].dtype != x.dtype or params[0].device != x.device):
        return None
    if torch.is_autocast_enabled(x.device.type) or _has_hooks(st.watch):
        return None
    inner = x if st.groups == 1 else x[:, :st.channels // st.groups]
    if backend is None:
        impl = cnn_edge.choose(st.plan, inner, w)
        if impl is None:
            return None
        backend = impl.backend
    elif not cnn_edge._plan_fusable(st.plan):
        return None
    if st.alpha is not None:
        w = torch.softmax(w.reshape(-1), dim=0)
    out = cnn_edge.cnn_edge(st.plan, inner, w, backend)
    if st.groups > 1:
        out = partial_channel(out, x, st.groups, st.stride, backend=backend)
    return out


def _accelerated_forward(self: nn.Module, x, *args, **kwargs):
    st: _Accel = self.__dict__[_STATE]
    out = None
    if isinstance(x, torch.Tensor) and not kwargs:
        if st.alpha is None:
            if len(args) == 1 and isinstance(args[0], torch.Tensor):
                out = _fused_call(st, x, args[0])
        elif not args:
            out = _fused_call(st, x, getattr(self, st.alpha))
    return out if out is not None else st.own_forward(self)(x, *args, **kwargs)


def _pending_forward(self: nn.Module, x, *args, **kwargs):
    """The first call of a mixed op accelerated without example inputs: check on this input, then switch."""
    st: _Accel = self.__dict__[_STATE]
    if isinstance(x, torch.Tensor) and not torch.compiler.is_compiling() and not _autodiff.under_transform():
        _settle(self, st, x)
    return self.forward(x, *args, **kwargs)


def _install(module: nn.Module, st: _Accel, fn) -> None:
    module.__dict__[_STATE] = st
    module.__dict__["forward"] = types.MethodType(fn, module)


def _uninstall(module: nn.Module) -> None:
    st = module.__dict__.pop(_STATE, None)
    if st is None:
        return
    module.__dict__.pop("forward", None)
    if st.original is not None:
        module.__dict__["forward"] = st.original


# ---- proving ------------------------------------------------------------------------------------------------


def _crop(x: torch.Tensor) -> torch.Tensor:
    def keep(n):
        return min(n, _PROBE_PIXELS) if n % 2 == 0 else min(n, _PROBE_PIXELS - 1)

    return x.detach()[:_PROBE_BATCH, :, :keep(x.shape[2]), :keep(x.shape[3])].clone()


def _plain_copy(module: nn.Module, st: _Accel, device, dtype) -> nn.Module:
    """A deep copy of the mixed op as its code defines it (no pynas forward, no hooks), in training mode, on
    ``device`` in ``dtype`` (the tensors it holds outside its parameters too), its alpha requiring grad."""
    saved = {k: module.__dict__.pop(k) for k in (_STATE, "forward") if k in module.__dict__}
    try:
        c = copy.deepcopy(module)
    finally:
        module.__dict__.update(saved)
    if st.original is not None and hasattr(st.original, "__func__"):
        c.__dict__["forward"] = types.MethodType(st.original.__func__, c)
    for m in c.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
            hooks.clear()
    c.train()
    c.to(device=device, dtype=dtype)
    for k, v in list(vars(c).items()):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not isinstance(v, nn.Parameter):
            c.__dict__[k] = v.detach().to(device=device, dtype=dtype).requires_grad_(k == st.alpha or v.requires_grad)
    return c


def _opaque_kind(op: nn.Module, x: torch.Tensor) -> Tuple[Optional[str], Optional[int]]:
    """('skip', 1) when its output is its input, ('zero', s) when zeros of the stride-s shape: one call on a copy."""
    with torch.no_grad():
        y = copy.deepcopy(op)(x.clone())
    if not isinstance(y, torch.Tensor):
        return None, None
    if y.shape == x.shape and torch.equal(y, x):
        return "skip", 1
    n, c, h, w = x.shape
    for s in (1, 2):
        if y.shape == (n, c, (h - 1) // s + 1, (w - 1) // s + 1) and not y.any():
            return "zero", s
    return None, None


def _recognise(found: _Found, module: nn.Module, x: torch.Tensor) -> Tuple[Optional[str], List[Candidate]]:
    """The candidates as recognised on the probe, and why the mixed op cannot run fused (None when it may)."""
    cands = [classify(i, k, op) for i, (k, op) in enumerate(zip(found.keys, found.items(module)))]
    chans = [c.channels for c in cands if c.channels]
    xin = x[:, :chans[0]] if chans and chans[0] < x.shape[1] and x.shape[1] % chans[0] == 0 else x
    for c in cands:
        if c.kind == "opaque":
            c.kind, c.stride = _opaque_kind(c.module, xin)
            if c.kind is None:
                c.reason = f"a parameterless {type(c.module).__name__} whose output is neither its input nor zeros"
    for c in cands:
        if c.kind is None:
            return f"candidate {c.key} ({type(c.module).__name__}): {c.reason}", cands
    strides = {c.stride for c in cands}
    if len(strides) != 1:
        return f"the candidates disagree on the stride ({sorted(strides)})", cands
    for c in cands:
        same = [d for d in cands if d.kind == c.kind]
        if c.kind in ("max", "avg", "skip") and len(same) > 1:
            return f"{len(same)} candidates of kind {c.name} (the fused edge takes one)", cands
    if len(set(chans)) > 1:
        return f"the candidates disagree on the channel count ({sorted(set(chans))})", cands
    if chans and chans[0] != x.shape[1] and xin is x:
        return f"its candidates have {chans[0]} channels and its input {x.shape[1]}", cands
    return None, cands


def _alpha_names(module: nn.Module, n: int) -> List[str]:
    """Tensors the layer holds itself (not its candidates) with one entry per candidate: its alpha, maybe."""
    out = [k for k, p in module._parameters.items() if p is not None and p.numel() == n and p.is_floating_point()]
    out += [k for k, v in vars(module).items() if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)
            and v.numel() == n and v.is_floating_point() and k not in out]
    return out


def _build(st: _Accel, cands: List[Candidate], x: torch.Tensor) -> None:
    st.kinds = [(c.kind, c.stride) for c in cands]
    st.stride = cands[0].stride
    chans = [c.channels for c in cands if c.channels is not None]
    st.channels = x.shape[1]
    st.groups = x.shape[1] // chans[0] if chans else 1
    st.plan = ForeignPlan(cands, st.stride)
    st.even = (st.groups > 1 and st.stride == 2) or any(c.kind == "fr" for c in cands)
    st.watch = [m for c in cands for m in c.module.modules()]


def _rel(a: Optional[torch.Tensor], b: Optional[torch.Tensor], like: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|), a missing gradient read as zeros."""
    a = torch.zeros_like(like) if a is None else a.detach()
    b = torch.zeros_like(like) if b is None else b.detach()
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _compare(module: nn.Module, st: _Accel, x: torch.Tensor, weight_sets: Sequence[torch.Tensor], device, dtype,
             backend: str, gen: torch.Generator) -> Tuple[float, str]:
    """The largest relative difference between the fused path (through ``backend``) and the module's own forward
    over ``weight_sets``, on two copies of the module (their buffers reset between sets), and what it is in."""
    worst, where = 0.0, "nothing"
    mine, theirs = _plain_copy(module, st, device, dtype), _plain_copy(module, st, device, dtype)
    sub = st.bind(mine)
    for i, w0 in enumerate(weight_sets):
        if i:  # the running statistics back to the module's (the copies' parameters are never written)
            with torch.no_grad():
                for copies in (mine, theirs):
                    for b, orig in zip(copies.buffers(), module.buffers()):
                        b.copy_(orig)
        xm, xt = (x.to(device=device, dtype=dtype).clone().requires_grad_() for _ in range(2))
        w0 = w0.to(device=device, dtype=dtype)
        if st.alpha is None:
            wm, wt = w0.clone().requires_grad_(), w0.clone().requires_grad_()
            out_t = theirs(xt, wt)
            out_m = _fused_call(sub, xm, wm, backend)
        else:
            wm, wt = getattr(mine, st.alpha), getattr(theirs, st.alpha)
            with torch.no_grad():
                wm.copy_(w0.view_as(wm))
                wt.copy_(w0.view_as(wt))
            out_t = theirs(xt)
            out_m = _fused_call(sub, xm, wm, backend)
        if out_m is None:
            return float("inf"), "the fused kernels do not take the probe"
        if not isinstance(out_t, torch.Tensor) or out_t.shape != out_m.shape:
            got = tuple(out_t.shape) if isinstance(out_t, torch.Tensor) else type(out_t).__name__
            return float("inf"), f"its output is {got} where the fused path gives {tuple(out_m.shape)}"
        g = torch.randn(out_t.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        names = [k for k, _ in theirs.named_parameters()]
        pm, pt = [p for _, p in mine.named_parameters()], [p for _, p in theirs.named_parameters()]
        extra = not isinstance(wt, nn.Parameter)  # the weights argument, or an alpha outside the parameters
        wrt_m, wrt_t = [xm] + [wm] * extra + pm, [xt] + [wt] * extra + pt
        gm = torch.autograd.grad(out_m, wrt_m, g, allow_unused=True)
        gt = torch.autograd.grad(out_t, wrt_t, g, allow_unused=True)
        labels = ["the output", "the input's gradient"] + ["the weights' gradient"] * extra + \
                 [f"the gradient of {k}" for k in names]
        triples = [(out_m, out_t, out_t)] + list(zip(gm, gt, wrt_t))
        bm, bt = dict(mine.named_buffers()), dict(theirs.named_buffers())
        labels += [f"buffer {k}" for k in bt]
        triples += [(bm[k], bt[k], bt[k]) for k in bt]
        for label, (a, b, like) in zip(labels, triples):
            e = _rel(a, b, like)
            if e > worst:
                worst, where = e, label
    return worst, where


def _weight_sets(st: _Accel, gen: torch.Generator) -> List[torch.Tensor]:
    """A dense random weighting and a sparse one (about half the weights exactly 0), as the forward takes them:
    softmaxed for a weights argument, logits for the layer's own alpha."""
    n = st.n
    logits = torch.randn(n, generator=gen, dtype=torch.float64)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=gen)[: max(1, n // 2)]] = True
    if st.alpha is not None:
        return [logits, torch.where(keep, logits, torch.full_like(logits, -1e4))]
    w = torch.softmax(logits, 0)
    return [w, torch.where(keep, w, torch.zeros_like(w))]


def _settle(module: nn.Module, st: _Accel, x: torch.Tensor) -> None:
    """Recognise, prove and switch one mixed op on its probe input ``x``, or restore its own forward."""
    v = st.found.verdict
    v.pending = False
    try:
        with torch.enable_grad():
            _prove(module, st, _crop(x))
    except Exception as exc:  # a forward that fails on the copies: the module stays its own, with the reason
        v.accelerated, v.reason = False, f"the check raised {type(exc).__name__}: {exc}"
    if v.accelerated:
        _install(module, st, _accelerated_forward)
    else:
        module.__dict__[_STATE] = st
        _uninstall(module)


def _prove(module: nn.Module, st: _Accel, probe: torch.Tensor) -> None:
    v = st.found.verdict
    if probe.dim() != 4:
        v.reason = f"its input is not a 4-D (N, C, H, W) tensor (shape {tuple(probe.shape)})"
        return
    why, cands = _recognise(st.found, module, probe)
    v.candidates = [(c.key, type(c.module).__name__, c.name) for c in cands]
    if why:
        v.reason = why
        return
    names: List[Optional[str]] = [None]
    if not st.found.weights_arg:
        names = _alpha_names(module, st.n)
        if not names:
            v.reason = f"forward(x) takes no weights and the layer holds no tensor of {st.n} entries (its alpha)"
            return
    _build(st, cands, probe)
    if not st.plan.supported:
        v.reason = "its BatchNorms differ in eps or momentum (the fused edge takes one of each)"
        return
    v.form = "weighted sum" if st.groups == 1 else f"partial channels K={st.groups}"
    gen = torch.Generator().manual_seed(0)
    failures = []
    for name in names:
        st.alpha = name
        v.weights = "argument" if name is None else f"own {name!r} (softmax)"
        if not st.found.verify:
            v.accelerated, v.note = True, "not verified (verify=False)"
            return
        err, where = _compare(module, st, probe, _weight_sets(st, gen), torch.device("cpu"), torch.float64,
                              "cpu", gen)
        if err <= _TOL[torch.float64]:
            v.accelerated, v.error = True, err
            break
        failures.append(f"{where} differs by {err:.1e} (relative)" if err != float("inf") else where)
    if not v.accelerated:
        st.alpha = None
        v.reason = "its forward is not what the fused path computes: " + "; ".join(failures)
        return
    # The model's own dtype and device, through the implementation the backend in force picks for them.
    params = st.plan.params()
    dev, dtype = (params[0].device, params[0].dtype) if params else (probe.device, probe.dtype)
    inner = probe if st.groups == 1 else probe[:, :st.channels // st.groups]
    impl = cnn_edge.TABLE.resolve([inner.to(dev, dtype), inner.new_empty(st.n).to(dev, dtype)], strict=False)
    if impl is None or impl.backend == "reference":
        v.note = f"no fused implementation takes {dtype} on {dev.type} under the backend in force: its own forward runs"
        return
    tol = _TOL.get(dtype, 2e-2)
    err, where = _compare(module, st, probe, _weight_sets(st, gen)[:1], dev, dtype, impl.backend, gen)
    if err > tol:
        v.accelerated = False
        v.reason = f"on {dtype} {dev.type} through {impl.backend!r}, {where} differs by {err:.1e} (tolerance {tol})"
        return
    v.runs_on = impl.backend


# ---- the public calls ---------------------------------------------------------------------------------------


def _capture(model: nn.Module, modules: Sequence[nn.Module], example_inputs) -> Dict[int, torch.Tensor]:
    """Each module's first input in one forward of the model on ``example_inputs``; the model's buffers and the
    random number generators are as before afterwards (the forward runs without grad)."""
    seen: Dict[int, torch.Tensor] = {}

    def hook(mod, args):
        if id(mod) not in seen and args and isinstance(args[0], torch.Tensor):
            seen[id(mod)] = args[0].detach().clone()

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"} |
                     {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model(*inputs)
    except Exception as exc:
        raise ValueError(f"example_inputs: the model's forward failed on them: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return seen


def accelerate(model: nn.Module, *, example_inputs: Any = None, verify: bool = True) -> AccelerationReport:
    """Route the mixed ops of another codebase's DARTS supernet through pynas's fused edge, where proven equal.

    Args:
        model: the supernet (any ``nn.Module``); its mixed ops are found by structure (module docstring).
        example_inputs: what ``model(*example_inputs)`` takes (a tensor or a tuple), run once without grad to
            capture each mixed op's input (the buffers and the random number generators are restored after).
            ``None``: each mixed op is checked at its first call instead (run one eager forward before
            ``torch.compile``).
        verify: prove each switch on the probe (float64, forward, backward, running statistics). ``False``
            switches on recognition alone.

    Returns:
        An :class:`AccelerationReport`: every mixed op found, accelerated or left alone with the reason.
        Calling :func:`accelerate` again re-checks from scratch; :func:`deaccelerate` restores every forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify: expected a bool, got {type(verify).__name__}")
    deaccelerate(model)
    found = find_mixed_ops(model, verify)
    states = [(m, _Accel(f, m.__dict__.get("forward"))) for m, f in found]
    if example_inputs is None:
        for m, st in states:
            st.found.verdict.pending = True
            _install(m, st, _pending_forward)
    elif states:
        probes = _capture(model, [m for m, _ in states], example_inputs)
        for m, st in states:
            if id(m) in probes:
                _settle(m, st, probes[id(m)])
            else:
                st.found.verdict.reason = "the model's forward on example_inputs did not call it"
    return AccelerationReport(model, [f.verdict for _, f in found])


def deaccelerate(model: nn.Module) -> int:
    """Restore the original forward of every mixed op :func:`accelerate` switched (or left pending); returns how
    many were restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    n = 0
    for m in model.modules():
        if _STATE in m.__dict__:
            _uninstall(m)
            n += 1
    return n


@contextlib.contextmanager
def accelerated(model: nn.Module, *, example_inputs: Any = None, verify: bool = True) -> Iterator[AccelerationReport]:
    """``with accelerated(model) as report:``: :func:`accelerate` inside the block, :func:`deaccelerate` after."""
    report = accelerate(model, example_inputs=example_inputs, verify=verify)
    try:
        yield report
    finally:
        deaccelerate(model)
