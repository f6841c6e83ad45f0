"""A plain functional DARTS CNN supernet, written from the semantics (docs/darts.md, "CNN space", and the
methods' rules in pynas/strategies), for the method tests: the weights are looked up in a pynas network's
state_dict by name, BatchNorm statistics are kept in a separate dict that the reference updates itself.

A cell type's plan is a dict: ``weights`` (edges, candidates), ``selected`` (None, or per edge a tuple of the
candidates computed), ``straight_through`` (the unselected candidates add their weight as a scalar),
``edge_scale`` (None, or per edge a factor of its output in the node sum), ``k`` (PC-DARTS's partial channels:
None or K).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pynas.cnn.operations import PRIMITIVES

EPS, MOMENTUM = 1e-5, 0.1


def params_and_stats(model):
    """(P, R): the model's parameters by name (the same tensors) and copies of its BatchNorm statistics."""
    P = dict(model.named_parameters())
    R = {name: b.detach().clone() for name, b in model.named_buffers()}
    return P, R


def leaf_copies(model):
    """Independent leaf copies of the parameters (for a reference trajectory)."""
    return {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}


def _bn(x, R, key):
    """Training-mode BatchNorm without affine: batch statistics; the running ones updated in R (in place)."""
    rm, rv = R.get(key + ".running_mean"), R.get(key + ".running_var")
    if rm is not None:
        R[key + ".num_batches_tracked"] += 1
    return F.batch_norm(x, rm, rv, None, None, True, MOMENTUM, EPS)


def _relu_conv_bn(x, P, R, key):
    return _bn(F.conv2d(F.relu(x), P[key + ".op.1.weight"]), R, key + ".op.2")


def _factorized_reduce(x, P, R, key):
    r = F.relu(x)
    out = torch.cat([F.conv2d(r, P[key + ".conv_1.weight"], stride=2),
                     F.conv2d(r[:, :, 1:, 1:], P[key + ".conv_2.weight"], stride=2)], 1)
    return _bn(out, R, key + ".bn")


def candidate(name, x, P, R, key, stride):
    """One search candidate (its BatchNorms without affine, the pools followed by one)."""
    C = x.shape[1]
    if name == "max_pool_3x3":
        return _bn(F.max_pool2d(x, 3, stride, 1), R, key + ".1")
    if name == "avg_pool_3x3":
        return _bn(F.avg_pool2d(x, 3, stride, 1, count_include_pad=False), R, key + ".1")
    if name == "skip_connect":
        return x if stride == 1 else _factorized_reduce(x, P, R, key)
    k = int(name[-1])
    if name.startswith("sep_conv"):
        y = F.conv2d(F.relu(x), P[key + ".op.1.weight"], stride=stride, padding=k // 2, groups=C)
        y = _bn(F.conv2d(y, P[key + ".op.2.weight"]), R, key + ".op.3")
        y = F.conv2d(F.relu(y), P[key + ".op.5.weight"], padding=k // 2, groups=C)
        return _bn(F.conv2d(y, P[key + ".op.6.weight"]), R, key + ".op.7")
    if name.startswith("dil_conv"):
        y = F.conv2d(F.relu(x), P[key + ".op.1.weight"], stride=stride, padding=k - 1, dilation=2, groups=C)
        return _bn(F.conv2d(y, P[key + ".op.2.weight"]), R, key + ".op.3")
    raise AssertionError(name)


def _out_size(x, stride):
    n, c, h, w = x.shape
    return n, c, (h - 1) // stride + 1, (w - 1) // stride + 1


def edge(x, P, R, key, stride, w, selected=None, straight_through=False, k=None):
    """``sum_k w[k] op_k(x)`` over the computed candidates (every one but 'none', or ``selected``), plus the scalar
    weights of the unselected ones with ``straight_through``; with ``k`` the PC-DARTS edge around it."""
    if k is not None:
        C = x.shape[1]
        inner = edge(x[:, :C // k], P, R, key, stride, w, selected, straight_through)
        rest = x[:, C // k:]
        bypass = rest if stride == 1 else F.max_pool2d(rest, 2, 2)
        ans = torch.cat([inner, bypass], 1)
        n, c, h, ww = ans.shape
        out = torch.empty_like(ans)
        for g in range(k):  # the channel shuffle, channel by channel: out[c' k + g] = ans[g C/k + c']
            for cp in range(c // k):
                out[:, cp * k + g] = ans[:, g * (c // k) + cp]
        return out
    names = PRIMITIVES
    chosen = range(len(names)) if selected is None else selected
    out = torch.zeros(_out_size(x, stride), dtype=x.dtype)
    for j in chosen:
        if names[j] != "none":
            out = out + w[j] * candidate(names[j], x, P, R, f"{key}._ops.{j}", stride)
    if straight_through:
        for j in range(len(names)):
            if j not in chosen:
                out = out + w[j]
    return out


def forward(P, R, x, layers, plans, steps=4, multiplier=4):
    """The supernet's logits; ``plans`` = (normal plan, reduce plan)."""
    R["stem.1.num_batches_tracked"] += 1  # the stem's BatchNorm is affine
    s = F.batch_norm(F.conv2d(x, P["stem.0.weight"], padding=1), R["stem.1.running_mean"], R["stem.1.running_var"],
                     P["stem.1.weight"], P["stem.1.bias"], True, MOMENTUM, EPS)
    s0 = s1 = s
    reduction_prev = False
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        plan = plans[1] if reduction else plans[0]
        key = f"cells.{i}"
        t0 = _factorized_reduce(s0, P, R, key + ".preprocess0") if reduction_prev else \
            _relu_conv_bn(s0, P, R, key + ".preprocess0")
        states = [t0, _relu_conv_bn(s1, P, R, key + ".preprocess1")]
        e = 0
        for node in range(steps):
            total = None
            for j, h in enumerate(states):
                stride = 2 if reduction and j < 2 else 1
                sel = None if plan.get("selected") is None else plan["selected"][e]
                if sel is not None and not sel and not plan.get("straight_through"):
                    e += 1
                    continue
                y = edge(h, P, R, f"{key}._ops.{e}", stride, plan["weights"][e], sel, plan.get("straight_through", False),
                         plan.get("k"))
                if plan.get("edge_scale") is not None:
                    y = plan["edge_scale"][e] * y
                total = y if total is None else total + y
                e += 1
            if total is None:
                total = torch.zeros(_out_size(states[1], 2 if reduction else 1), dtype=x.dtype)
            states.append(total)
        s0, s1 = s1, torch.cat(states[-multiplier:], 1)
        reduction_prev = reduction
    return F.linear(s1.mean((2, 3)), P["classifier.weight"], P["classifier.bias"])
