"""The DARTS CNN evaluation network against a plain functional network written here from its semantics
(docs/darts.md, "Evaluation network"): the same weights, looked up by their state_dict names, give the same
logits, auxiliary logits, loss and gradients; the parameter count of the paper's second-order cell."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pynas.cnn import PUBLISHED, EvalNetwork, Genotype, count_parameters
from pynas.cnn.model_eval import drop_path


def _bn(x, P, key, training):
    # a copy of the running statistics: the reference must not move the network's own
    return F.batch_norm(x, P[key + ".running_mean"].clone(), P[key + ".running_var"].clone(), P[key + ".weight"],
                        P[key + ".bias"], training, 0.1, 1e-5)


def _relu_conv_bn(x, P, key, training, stride=1):
    return _bn(F.conv2d(F.relu(x), P[key + ".op.1.weight"], stride=stride), P, key + ".op.2", training)


def _factorized_reduce(x, P, key, training):
    r = F.relu(x)
    out = torch.cat([F.conv2d(r, P[key + ".conv_1.weight"], stride=2),
                     F.conv2d(r[:, :, 1:, 1:], P[key + ".conv_2.weight"], stride=2)], 1)
    return _bn(out, P, key + ".bn", training)


def _candidate(name, x, P, key, stride, training):
    C = x.shape[1]
    if name == "max_pool_3x3":
        return F.max_pool2d(x, 3, stride, 1)
    if name == "avg_pool_3x3":
        return F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
    if name == "skip_connect":
        return x if stride == 1 else _factorized_reduce(x, P, key, training)
    k = int(name[-1])
    if name.startswith("sep_conv"):
        y = F.conv2d(F.relu(x), P[key + ".op.1.weight"], stride=stride, padding=k // 2, groups=C)
        y = _bn(F.conv2d(y, P[key + ".op.2.weight"]), P, key + ".op.3", training)
        y = F.conv2d(F.relu(y), P[key + ".op.5.weight"], padding=k // 2, groups=C)
        return _bn(F.conv2d(y, P[key + ".op.6.weight"]), P, key + ".op.7", training)
    if name.startswith("dil_conv"):
        y = F.conv2d(F.relu(x), P[key + ".op.1.weight"], stride=stride, padding=k - 1, dilation=2, groups=C)
        return _bn(F.conv2d(y, P[key + ".op.2.weight"]), P, key + ".op.3", training)
    raise AssertionError(name)


def reference_forward(P, genotype, layers, x, training, auxiliary):
    """Stem, ``layers`` cells (reduction at layers // 3 and 2 layers // 3), global pool, linear; the auxiliary
    head on the output of cell 2 layers // 3 (training only). No drop path."""
    s = _bn(F.conv2d(x, P["stem.0.weight"], padding=1), P, "stem.1", training)
    s0 = s1 = s
    reduction_prev, aux = False, None
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        genes, concat = (genotype.reduce, genotype.reduce_concat) if reduction else \
            (genotype.normal, genotype.normal_concat)
        key = f"cells.{i}"
        if reduction_prev:
            t0 = _factorized_reduce(s0, P, key + ".preprocess0", training)
        else:
            t0 = _relu_conv_bn(s0, P, key + ".preprocess0", training)
        states = [t0, _relu_conv_bn(s1, P, key + ".preprocess1", training)]
        for node in range(len(genes) // 2):
            total = 0
            for e in (2 * node, 2 * node + 1):
                name, j = genes[e]
                stride = 2 if reduction and j < 2 else 1
                total = total + _candidate(name, states[j], P, f"{key}._ops.{e}", stride, training)
            states.append(total)
        s0, s1 = s1, torch.cat([states[c] for c in concat], 1)
        reduction_prev = reduction
        if i == 2 * layers // 3 and auxiliary and training:
            a = F.avg_pool2d(F.relu(s1), 5, 3, 0, count_include_pad=False)
            a = F.relu(_bn(F.conv2d(a, P["auxiliary_head.features.2.weight"]), P, "auxiliary_head.features.3",
                           training))
            a = F.relu(_bn(F.conv2d(a, P["auxiliary_head.features.5.weight"]), P, "auxiliary_head.features.6",
                           training))
            aux = F.linear(a.flatten(1), P["auxiliary_head.classifier.weight"], P["auxiliary_head.classifier.bias"])
    pooled = s1.mean((2, 3))
    return F.linear(pooled, P["classifier.weight"], P["classifier.bias"]), aux


def _randomised(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 1:  # BatchNorm scales away from 1
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


GENOTYPES = {
    "DARTS_V1": PUBLISHED["DARTS_V1"],
    "DARTS_V2": PUBLISHED["DARTS_V2"],
    # every candidate once, inputs from every state, a 3-node concat
    "all_ops": Genotype(normal=[("sep_conv_5x5", 0), ("dil_conv_5x5", 1), ("avg_pool_3x3", 2), ("skip_connect", 1),
                                ("max_pool_3x3", 3), ("sep_conv_3x3", 2), ("dil_conv_3x3", 4), ("skip_connect", 0)],
                        normal_concat=[3, 4, 5],
                        reduce=[("skip_connect", 0), ("sep_conv_5x5", 1), ("avg_pool_3x3", 1), ("dil_conv_5x5", 2),
                                ("max_pool_3x3", 0), ("skip_connect", 3), ("dil_conv_3x3", 1), ("sep_conv_3x3", 4)],
                        reduce_concat=[2, 4, 5]),
}


@pytest.mark.parametrize("name", list(GENOTYPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_the_reference(name, training):
    torch.manual_seed(0)
    genotype = GENOTYPES[name]
    model = _randomised(EvalNetwork(4, 10, 5, True, genotype).double(), seed=1)
    model.train(training)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    logits, aux = model(x)
    P = dict(model.named_parameters())
    P.update(dict(model.named_buffers()))
    ref_logits, ref_aux = reference_forward(P, genotype, 5, x, training, auxiliary=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    if training:
        torch.testing.assert_close(aux, ref_aux, rtol=1e-10, atol=1e-10)
    else:
        assert aux is None and ref_aux is None
    params = [p for n, p in model.named_parameters() if training or "auxiliary" not in n]
    loss = F.cross_entropy(logits, y) + (0.4 * F.cross_entropy(aux, y) if training else 0)
    ref_loss = F.cross_entropy(ref_logits, y) + (0.4 * F.cross_entropy(ref_aux, y) if training else 0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for (n, _), g, r in zip([(n, p) for n, p in model.named_parameters() if training or "auxiliary" not in n],
                            grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=n)


def test_no_auxiliary_head():
    model = EvalNetwork(4, 10, 5, False, PUBLISHED["DARTS"])
    assert not any("auxiliary" in n for n, _ in model.named_parameters())
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert aux is None and logits.shape == (2, 10)


def test_parameter_count_of_the_papers_cell():
    """The paper's table: the second-order cell at C=36, 20 layers has 3.3 M weights (counted without the
    auxiliary head, as the original code counts)."""
    model = EvalNetwork(36, 10, 20, True, PUBLISHED["DARTS_V2"])
    n = count_parameters(model)
    assert round(n / 1e6, 1) == 3.3, n
    assert n == sum(p.numel() for name, p in model.named_parameters() if not name.startswith("auxiliary_head."))
    assert sum(p.numel() for p in model.parameters()) > n  # the head exists and is left out


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
    torch.manual_seed(3)
    x = torch.rand(20000, 2, 3, 3) + 1.0
    y = drop_path(x, 0.3)
    dropped = (y == 0).flatten(1).all(1)
    kept = (y != 0).flatten(1).all(1)
    assert bool((dropped | kept).all())  # whole samples only
    assert abs(float(dropped.float().mean()) - 0.3) < 0.015
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    assert drop_path(x, 0.0) is x


def test_drop_path_spares_identities_and_only_trains():
    torch.manual_seed(0)
    # a cell of identities only (skip_connect at stride 1 everywhere): drop path never applies
    skips = Genotype(normal=[("skip_connect", 0), ("skip_connect", 1)] * 4, normal_concat=[2, 3, 4, 5],
                     reduce=PUBLISHED["DARTS"].reduce, reduce_concat=[2, 3, 4, 5])
    model = EvalNetwork(4, 10, 5, False, skips)
    cell = model.cells[0]
    s = torch.randn(4, 12, 8, 8)
    cell.train()
    torch.testing.assert_close(cell(s, s, 0.9), cell(s, s, 0.0))
    model2 = EvalNetwork(4, 10, 5, False, PUBLISHED["DARTS"])
    cell2 = model2.cells[0]
    cell2.eval()
    torch.testing.assert_close(cell2(s, s, 0.9), cell2(s, s, 0.0))
    cell2.train()
    torch.manual_seed(1)
    a = cell2(s, s, 0.9)
    torch.manual_seed(1)
    b = cell2(s, s, 0.0)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad,match", [
    (dict(C=0), "C: expected a positive integer"),
    (dict(C=5), "C: expected an even channel count"),
    (dict(layers=True), "layers: expected a positive integer"),
    (dict(genotype="DARTS"), "genotype: expected a Genotype"),
])
def test_bad_arguments_are_named(bad, match):
    kw = dict(C=4, num_classes=10, layers=5, auxiliary=True, genotype=PUBLISHED["DARTS"])
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        EvalNetwork(**kw)
