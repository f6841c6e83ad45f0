"""pynas.compat.darts.cnn against an independent plain-PyTorch DARTS CNN search network.

The ``Ref*`` classes below are written from docs/darts.md and the DARTS reference
code's ``model_search.py`` / ``operations.py`` layout (module names, state_dict
keys, 'none' computed as a zero multiply). They share no code with pynas.
"""
from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pynas
from pynas.cnn import from_json, to_json
from pynas.compat.darts.cnn import OPS, PRIMITIVES, Architect, Cell, Genotype, MixedOp, Network

# ----------------------------------------------------------------------------------------------
# Independent reference (DARTS cnn/operations.py + cnn/model_search.py semantics)
# ----------------------------------------------------------------------------------------------

REF_PRIMITIVES = [
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
]
RefGenotype = namedtuple("RefGenotype", "normal normal_concat reduce reduce_concat")


pytestmark = pytest.mark.usefixtures("one_thread")


class RefReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, k, stride, pad, affine):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(), nn.Conv2d(C_in, C_out, k, stride, pad, bias=False),
                                nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class RefDilConv(nn.Module):
    def __init__(self, C_in, C_out, k, stride, pad, dil, affine):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C_in, C_in, k, stride, pad, dilation=dil, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class RefSepConv(nn.Module):
    def __init__(self, C_in, C_out, k, stride, pad, affine):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C_in, C_in, k, stride, pad, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(),
            nn.Conv2d(C_in, C_in, k, 1, pad, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class RefIdentity(nn.Module):
    def forward(self, x):
        return x


class RefZero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


class RefFactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, affine):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


REF_OPS = {
    "none": lambda C, s: RefZero(s),
    "max_pool_3x3": lambda C, s: nn.Sequential(nn.MaxPool2d(3, stride=s, padding=1),
                                               nn.BatchNorm2d(C, affine=False)),
    "avg_pool_3x3": lambda C, s: nn.Sequential(nn.AvgPool2d(3, stride=s, padding=1, count_include_pad=False),
                                               nn.BatchNorm2d(C, affine=False)),
    "skip_connect": lambda C, s: RefIdentity() if s == 1 else RefFactorizedReduce(C, C, False),
    "sep_conv_3x3": lambda C, s: RefSepConv(C, C, 3, s, 1, False),
    "sep_conv_5x5": lambda C, s: RefSepConv(C, C, 5, s, 2, False),
    "dil_conv_3x3": lambda C, s: RefDilConv(C, C, 3, s, 2, 2, False),
    "dil_conv_5x5": lambda C, s: RefDilConv(C, C, 5, s, 4, 2, False),
}


class RefMixedOp(nn.Module):
    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList(REF_OPS[p](C, stride) for p in REF_PRIMITIVES)

    def forward(self, x, weights):
        # As the original: every candidate, 'none' included (a zero times its weight).
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class RefCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = RefFactorizedReduce(C_prev_prev, C, False)
        else:
            self.preprocess0 = RefReLUConvBN(C_prev_prev, C, 1, 1, 0, False)
        self.preprocess1 = RefReLUConvBN(C_prev, C, 1, 1, 0, False)
        self._steps, self._multiplier = steps, multiplier
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                self._ops.append(RefMixedOp(C, 2 if reduction and j < 2 else 1))

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class RefNetwork(nn.Module):
    def __init__(self, C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3):
        super().__init__()
        self._C, self._num_classes, self._layers = C, num_classes, layers
        self._criterion, self._steps, self._multiplier = criterion, steps, multiplier
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(RefCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        k = sum(2 + i for i in range(steps))
        self.alphas_normal = (1e-3 * torch.randn(k, len(REF_PRIMITIVES))).requires_grad_(True)
        self.alphas_reduce = (1e-3 * torch.randn(k, len(REF_PRIMITIVES))).requires_grad_(True)

    def arch_parameters(self):
        return [self.alphas_normal, self.alphas_reduce]

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            alphas = self.alphas_reduce if cell.reduction else self.alphas_normal
            s0, s1 = s1, cell(s0, s1, F.softmax(alphas, dim=-1))
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def _loss(self, x, target):
        return self._criterion(self(x), target)


def ref_parse(alphas: torch.Tensor, steps: int = 4):
    """The reference genotype rule, on softmax(alphas) in float64."""
    W = F.softmax(alphas.detach().double(), dim=-1).tolist()
    none = REF_PRIMITIVES.index("none")
    gene, start = [], 0
    for i in range(steps):
        rows = W[start:start + 2 + i]
        best = [max(w for k, w in enumerate(r) if k != none) for r in rows]
        edges = sorted(range(2 + i), key=lambda j: -best[j])[:2]
        for j in edges:
            ks = [k for k in range(len(rows[j])) if k != none]
            k_best = max(ks, key=lambda k: (rows[j][k], -k))
            gene.append((REF_PRIMITIVES[k_best], j))
        start += 2 + i
    return gene


def ref_genotype(alphas_normal, alphas_reduce, steps=4, multiplier=4):
    concat = list(range(2 + steps - multiplier, steps + 2))
    return RefGenotype(ref_parse(alphas_normal, steps), concat, ref_parse(alphas_reduce, steps), list(concat))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _usable_cpu_backends():
    """Backends that can take CPU float64 tensors here (Triton only under TRITON_INTERPRET=1)."""
    from pynas.ops._dispatch import TABLES

    probe = [torch.ones(1, dtype=torch.float64)]
    params = []
    for name in ("reference", "cpu", "triton"):
        why = "; ".join(TABLES["mixed_sum"][name].not_supported_reasons(probe)) or None
        params.append(pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=f"{name}: {why}")))
    return params


def _skip_interpreted_triton(backend):
    if backend == "triton" and not torch.cuda.is_available():
        # Every edge of the network runs as fused Triton kernels, which the interpreter takes minutes
        # over; tests/ops/test_cnn_edge.py and tests/ops/test_cnn_edge_triton.py check them under it edge by edge.
        pytest.skip("whole networks through the Triton interpreter are too slow for CI; run on a GPU")


def _assert_close(got, want, name, rtol=1e-10):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rtol * max(scale, 1e-300), f"{name}: max abs err {err:.3e} vs scale {scale:.3e}"


def _pair(C, num_classes, layers, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = Network(C, num_classes, layers, nn.CrossEntropyLoss()).to(dtype)
    ref = RefNetwork(C, num_classes, layers, nn.CrossEntropyLoss()).to(dtype)
    ref.alphas_normal = ref.alphas_normal.detach().to(dtype).requires_grad_(True)
    ref.alphas_reduce = ref.alphas_reduce.detach().to(dtype).requires_grad_(True)
    return net, ref


def _randomize(net, gen):
    """Non-trivial weights (and BN running stats) so that mistakes show."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.5)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=torch.float64).to(b.dtype) + 0.5)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

def test_interface_exports():
    assert list(PRIMITIVES) == REF_PRIMITIVES
    assert Genotype._fields == ("normal", "normal_concat", "reduce", "reduce_concat")
    for p in REF_PRIMITIVES:
        assert p in OPS
    # OPS[name](C, stride, affine): output shapes of every candidate, both strides.
    x = torch.randn(2, 4, 6, 6)
    for p in REF_PRIMITIVES:
        for stride, hw in ((1, 6), (2, 3)):
            y = OPS[p](4, stride, False)(x)
            assert tuple(y.shape) == (2, 4, hw, hw), (p, stride, tuple(y.shape))


@pytest.mark.parametrize("C,layers", [(16, 8), (4, 5), (4, 3)])
def test_state_dict_interchange_strict(C, layers):
    net, ref = _pair(C, 10, layers, dtype=torch.float32)
    sd_net, sd_ref = net.state_dict(), ref.state_dict()
    assert list(sd_net.keys()) == list(sd_ref.keys())
    for k in sd_ref:
        assert sd_net[k].shape == sd_ref[k].shape, k
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in ref.named_parameters()]
    # Spot-check a few of the reference names (docs/darts.md, "The original code's interface").
    for key in ("stem.0.weight", "stem.1.running_mean", "cells.0.preprocess0.op.1.weight",
                "cells.0._ops.0._ops.1.1.running_mean", "cells.0._ops.0._ops.4.op.1.weight",
                f"cells.{layers // 3 + 1}.preprocess0.conv_1.weight",
                f"cells.{layers // 3}._ops.0._ops.3.conv_2.weight",
                "classifier.weight", "classifier.bias"):
        assert key in sd_net, key

    gen = torch.Generator().manual_seed(1)
    _randomize(net, gen)
    ref.load_state_dict(net.state_dict(), strict=True)
    sd_net, sd_ref = net.state_dict(), ref.state_dict()
    assert all(torch.equal(sd_ref[k], sd_net[k]) for k in sd_net)
    first = net.state_dict()["classifier.weight"].clone()
    _randomize(ref, gen)
    net.load_state_dict(ref.state_dict(), strict=True)
    sd_net, sd_ref = net.state_dict(), ref.state_dict()
    assert all(torch.equal(sd_ref[k], sd_net[k]) for k in sd_net)
    assert not torch.equal(sd_net["classifier.weight"], first)  # the second copy did overwrite


def test_arch_tensors_outside_parameters_and_state_dict():
    net = Network(4, 10, 3, nn.CrossEntropyLoss())
    alphas = net.arch_parameters()
    assert len(alphas) == 2
    assert alphas[0] is net.alphas_normal and alphas[1] is net.alphas_reduce
    k = sum(2 + i for i in range(4))
    for a in alphas:
        assert tuple(a.shape) == (k, len(REF_PRIMITIVES))
        assert a.requires_grad and a.is_leaf
        assert not isinstance(a, nn.Parameter)
        assert all(p is not a for p in net.parameters())
        assert all(v.data_ptr() != a.data_ptr() for v in net.state_dict().values())
        # 1e-3 * randn initialisation: small, but not all zero.
        assert 0 < a.abs().max().item() < 1e-2
    assert not any("alpha" in k for k in net.state_dict())
    # The weight optimizer built from parameters() holds no alpha.
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(net.alphas_normal) not in held and id(net.alphas_reduce) not in held


def test_parameter_count_default_network():
    torch.manual_seed(0)
    net = Network(16, 10, 8, nn.CrossEntropyLoss())
    ref = RefNetwork(16, 10, 8, nn.CrossEntropyLoss())
    n_net = sum(p.numel() for p in net.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_net == n_ref
    assert 1.92e6 < n_ref < 1.94e6, n_ref  # "1.93 M weights"


@pytest.mark.parametrize("backend", _usable_cpu_backends())
@pytest.mark.parametrize("layers,hw", [(5, 12), (3, 16)])
def test_same_numbers_float64(backend, layers, hw):
    C, num_classes, N = 4, 7, 3
    _skip_interpreted_triton(backend)
    net, ref = _pair(C, num_classes, layers, seed=layers)
    gen = torch.Generator().manual_seed(100 + layers)
    _randomize(net, gen)
    ref.load_state_dict(net.state_dict(), strict=True)
    # Random, not tiny, alphas so that every candidate's weight matters.
    a_n = torch.randn(14, 8, generator=gen, dtype=torch.float64)
    a_r = torch.randn(14, 8, generator=gen, dtype=torch.float64)
    for m in (net, ref):
        with torch.no_grad():
            m.alphas_normal.copy_(a_n)
            m.alphas_reduce.copy_(a_r)
    assert net.cells[layers // 3].reduction and net.cells[2 * layers // 3].reduction
    assert isinstance(ref.cells[layers // 3 + 1].preprocess0, RefFactorizedReduce)

    x = torch.randn(N, 3, hw, hw, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (N,), generator=gen)

    net.train(), ref.train()
    with pynas.use_backend(backend):
        logits = net(x)
        loss = net._criterion(logits, y)
        loss.backward()
    logits_ref = ref(x)
    loss_ref = ref._criterion(logits_ref, y)
    loss_ref.backward()

    assert logits.dtype == torch.float64
    _assert_close(logits, logits_ref, "logits")
    _assert_close(loss, loss_ref, "loss")
    assert abs(loss.item() - loss_ref.item()) <= 1e-10 * abs(loss_ref.item())
    ref_params = dict(ref.named_parameters())
    n_checked = 0
    for name, p in net.named_parameters():
        q = ref_params[name]
        assert p.grad is not None, name
        _assert_close(p.grad, q.grad, f"grad {name}")
        n_checked += 1
    assert n_checked == len(ref_params)
    for a, b, nm in ((net.alphas_normal, ref.alphas_normal, "alphas_normal"),
                     (net.alphas_reduce, ref.alphas_reduce, "alphas_reduce")):
        assert a.grad is not None, nm
        assert a.grad.abs().max() > 0, nm
        _assert_close(a.grad, b.grad, f"grad {nm}")
    ref_bufs = dict(ref.named_buffers())
    for name, b in net.named_buffers():
        if b.dtype.is_floating_point:
            _assert_close(b, ref_bufs[name], f"buffer {name}")
        else:
            assert torch.equal(b, ref_bufs[name]), name
    assert ref_bufs["cells.0._ops.0._ops.1.1.num_batches_tracked"].item() == 1


@pytest.mark.parametrize("backend", _usable_cpu_backends())
def test_same_numbers_float32_against_float64_truth(backend):
    """float32: pynas's error against a float64 truth is at most a few times plain PyTorch's."""
    layers, C, num_classes, N, hw = 5, 4, 7, 3, 12
    _skip_interpreted_triton(backend)
    torch.manual_seed(21)
    ref64 = RefNetwork(C, num_classes, layers, nn.CrossEntropyLoss()).double()
    gen = torch.Generator().manual_seed(121)
    _randomize(ref64, gen)
    sd64 = ref64.state_dict()
    alphas = [torch.randn(14, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(N, 3, hw, hw, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (N,), generator=gen)

    def run(m, dtype, use):
        m.to(dtype).load_state_dict(sd64, strict=True)  # load_state_dict casts to m's dtype
        m.alphas_normal = alphas[0].to(dtype).requires_grad_(True) if isinstance(m, RefNetwork) else m.alphas_normal
        m.alphas_reduce = alphas[1].to(dtype).requires_grad_(True) if isinstance(m, RefNetwork) else m.alphas_reduce
        with torch.no_grad():
            m.alphas_normal.copy_(alphas[0])
            m.alphas_reduce.copy_(alphas[1])
        assert m.alphas_normal.dtype == dtype and next(m.parameters()).dtype == dtype
        with pynas.use_backend(use):
            logits = m(x.to(dtype))
            loss = m._criterion(logits, y)
            grads = torch.autograd.grad(loss, list(m.arch_parameters()) + list(m.parameters()))
        flat = torch.cat([g.reshape(-1) for g in grads[2:]]).double()
        return {"logits": logits.double(), "loss": loss.double(), "alphas_normal": grads[0].double(),
                "alphas_reduce": grads[1].double(), "weights": flat}

    want = run(ref64, torch.float64, "reference")
    base = run(RefNetwork(C, num_classes, layers, nn.CrossEntropyLoss()), torch.float32, "reference")
    got = run(Network(C, num_classes, layers, nn.CrossEntropyLoss()), torch.float32, backend)
    for k in want:
        err = (got[k] - want[k]).abs().max().item()
        err_base = (base[k] - want[k]).abs().max().item()
        scale = want[k].abs().max().item()
        assert err <= 4 * err_base + 1e-6 * scale, f"{k}: pynas err {err:.3e}, plain float32 err {err_base:.3e}"


def test_same_numbers_eval_mode_float64():
    """In eval mode the BN running statistics are used: check that path too."""
    net, ref = _pair(4, 5, 3, seed=3)
    gen = torch.Generator().manual_seed(7)
    _randomize(net, gen)
    ref.load_state_dict(net.state_dict(), strict=True)
    a = torch.randn(2, 14, 8, generator=gen, dtype=torch.float64)
    for m in (net, ref):
        with torch.no_grad():
            m.alphas_normal.copy_(a[0])
            m.alphas_reduce.copy_(a[1])
    net.eval(), ref.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    _assert_close(net(x), ref(x), "eval logits")


def test_genotype_matches_reference_rule():
    net = Network(4, 10, 3, nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(11)
    seen_orders = set()
    for trial in range(20):
        a_n = torch.randn(14, 8, generator=gen) * 2
        a_r = torch.randn(14, 8, generator=gen) * 2
        if trial == 0:
            a_n[:, 0] += 10.0  # 'none' dominates everywhere: it must still never be picked
        with torch.no_grad():
            net.alphas_normal.copy_(a_n)
            net.alphas_reduce.copy_(a_r)
        g = net.genotype()
        want = ref_genotype(a_n, a_r)
        assert [tuple(x) for x in g.normal] == want.normal
        assert [tuple(x) for x in g.reduce] == want.reduce
        assert list(g.normal_concat) == want.normal_concat == [2, 3, 4, 5]
        assert list(g.reduce_concat) == want.reduce_concat
        assert all(op != "none" for op, _ in g.normal + g.reduce)
        assert len(g.normal) == len(g.reduce) == 8
        # Node i's genes point to earlier states only.
        for genes in (g.normal, g.reduce):
            for i in range(4):
                for op, j in genes[2 * i:2 * i + 2]:
                    assert 0 <= j < 2 + i
            seen_orders.add(tuple(j for _, j in genes[2:4]))
        # JSON round trip.
        text = to_json(g)
        json.loads(text)
        back = from_json(text)
        assert [tuple(x) for x in back.normal] == [tuple(x) for x in g.normal]
        assert [tuple(x) for x in back.reduce] == [tuple(x) for x in g.reduce]
        assert list(back.normal_concat) == list(g.normal_concat)
        assert list(back.reduce_concat) == list(g.reduce_concat)
    # The gene order (best edge first, not by index) was exercised both ways.
    assert len(seen_orders) > 1


def test_genotype_json_rejects_garbage():
    with pytest.raises(ValueError):
        from_json("[1, 2, 3]")
    with pytest.raises(ValueError):
        from_json(json.dumps({"normal": [], "normal_concat": []}))


def test_new_copies_alphas():
    torch.manual_seed(0)
    net = Network(4, 10, 3, nn.CrossEntropyLoss()).double()
    with torch.no_grad():
        net.alphas_normal.copy_(torch.randn(14, 8))
        net.alphas_reduce.copy_(torch.randn(14, 8))
    new = net.new()
    assert type(new) is type(net)
    assert list(new.state_dict().keys()) == list(net.state_dict().keys())
    for a, b in zip(new.arch_parameters(), net.arch_parameters()):
        assert a is not b and a.data_ptr() != b.data_ptr()
        assert torch.equal(a, b)
        assert a.dtype == torch.float64 and a.requires_grad and a.is_leaf
    assert next(new.parameters()).dtype == torch.float64
    # A copy, not a view: changing the new one leaves the old one alone.
    before = net.alphas_normal.detach().clone()
    with torch.no_grad():
        new.alphas_normal.add_(1.0)
    assert torch.equal(net.alphas_normal, before)
    assert new._criterion is net._criterion or isinstance(new._criterion, nn.CrossEntropyLoss)


def test_to_and_double_move_alphas_in_place():
    net = Network(4, 10, 3, nn.CrossEntropyLoss())
    a_n, a_r = net.arch_parameters()
    vals = [a.detach().clone() for a in (a_n, a_r)]
    arch_opt = torch.optim.Adam(net.arch_parameters(), lr=0.1)
    net.double()
    assert net.arch_parameters()[0] is a_n and net.arch_parameters()[1] is a_r
    assert net.alphas_normal is a_n and net.alphas_reduce is a_r
    for a, v in zip((a_n, a_r), vals):
        assert a.dtype == torch.float64 and a.requires_grad and a.is_leaf
        assert torch.equal(a, v.double())
    # An optimizer built before the move still drives the same tensors.
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 3])
    net._loss(x, y).backward()
    assert a_n.grad is not None and a_n.grad.dtype == torch.float64
    arch_opt.step()
    assert not torch.equal(a_n, vals[0].double())
    # .to(dtype) moves the gradient as well, still in place.
    net.to(torch.float32)
    assert net.arch_parameters()[0] is a_n and a_n.dtype == torch.float32
    assert a_n.grad is None or a_n.grad.dtype == torch.float32
    net.to(device="cpu", dtype=torch.float64)
    assert net.arch_parameters()[1] is a_r and a_r.dtype == torch.float64


def test_mixedop_reference_signature_and_numbers():
    gen = torch.Generator().manual_seed(5)
    for stride in (1, 2):
        op = MixedOp(4, stride).double()
        ref = RefMixedOp(4, stride).double()
        assert list(op.state_dict().keys()) == list(ref.state_dict().keys())
        _randomize(op, gen)
        ref.load_state_dict(op.state_dict(), strict=True)
        x = torch.randn(3, 4, 10, 10, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.softmax(torch.randn(8, generator=gen, dtype=torch.float64), 0).requires_grad_(True)
        out = op(x, w)
        gx, gw = torch.autograd.grad((out * out).sum(), (x, w))
        out_r = ref(x, w)
        gx_r, gw_r = torch.autograd.grad((out_r * out_r).sum(), (x, w))
        assert tuple(out.shape) == (3, 4, 10 // stride, 10 // stride)
        _assert_close(out, out_r, f"MixedOp stride {stride}")
        _assert_close(gx, gx_r, f"MixedOp dx stride {stride}")
        _assert_close(gw, gw_r, f"MixedOp dweights stride {stride}")
        assert gw[0].item() == 0.0  # 'none' contributes nothing to y


@pytest.mark.parametrize("reduction,reduction_prev", [(False, False), (True, False), (False, True), (True, True)])
def test_cell_reference_signature_and_numbers(reduction, reduction_prev):
    gen = torch.Generator().manual_seed(int(reduction) * 2 + int(reduction_prev))
    steps, multiplier, C_pp, C_p, C = 4, 4, 6, 10, 4
    cell = Cell(steps, multiplier, C_pp, C_p, C, reduction, reduction_prev).double()
    ref = RefCell(steps, multiplier, C_pp, C_p, C, reduction, reduction_prev).double()
    assert cell.reduction == reduction
    assert list(cell.state_dict().keys()) == list(ref.state_dict().keys())
    _randomize(cell, gen)
    ref.load_state_dict(cell.state_dict(), strict=True)
    hw = 8
    s0 = torch.randn(2, C_pp, 2 * hw if reduction_prev else hw, 2 * hw if reduction_prev else hw,
                     generator=gen, dtype=torch.float64)
    s1 = torch.randn(2, C_p, hw, hw, generator=gen, dtype=torch.float64)
    w = torch.softmax(torch.randn(14, 8, generator=gen, dtype=torch.float64), -1)
    out, out_r = cell(s0, s1, w), ref(s0, s1, w)
    out_hw = hw // 2 if reduction else hw
    assert tuple(out.shape) == (2, multiplier * C, out_hw, out_hw)
    _assert_close(out, out_r, "cell output")


@pytest.mark.parametrize("kwargs", [dict(layers=0), dict(layers=-1), dict(C=0), dict(num_classes=0)])
def test_bad_network_arguments(kwargs):
    args = dict(C=4, num_classes=10, layers=3)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        Network(args["C"], args["num_classes"], args["layers"], nn.CrossEntropyLoss())
    assert next(iter(kwargs)) in str(info.value)


def test_bad_architect_args():
    net = Network(2, 3, 2, nn.CrossEntropyLoss())

    class Args:
        momentum = 0.9
        weight_decay = 3e-4
        arch_learning_rate = 3e-4

    with pytest.raises(ValueError, match="arch_weight_decay"):
        Architect(net, Args())


@pytest.mark.parametrize("bad", [
    {"normal": None},
    {"normal": [["sep_conv_3x3", None], ["skip_connect", 0]]},
    {"normal": [["sep_conv_3x3", 1.0], ["skip_connect", 0]]},
    {"normal": [["sep_conv_3x3", True], ["skip_connect", 0]]},
    {"normal": [["sep_conv_3x3", 2], ["skip_connect", 0]]},  # node 0 takes states 0..1
    {"normal": [["sep_conv_3x3", 0]]},  # two genes per node
    {"normal": [["conv_9x9", 0], ["skip_connect", 1]]},
    {"normal_concat": [2, 9]},
    {"normal_concat": None},
])
def test_genotype_json_checks_types_and_ranges(bad):
    good = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1]], "normal_concat": [2],
            "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]], "reduce_concat": [2]}
    assert from_json(json.dumps(good)).normal == [("sep_conv_3x3", 0), ("skip_connect", 1)]
    with pytest.raises(ValueError, match="text: "):
        from_json(json.dumps(dict(good, **bad)))
