"""The machine's roofs (pynas._C.roofline_fma_gflops / roofline_copy_gbs), the roofline rows of pynas bench, the
kernels' flop counts and the roofline picture. No timing is asserted: the measured numbers are only checked to be
positive, finite and consistent with each other."""
import json
import math

import pytest
import torch

from pynas import _ext, bench

C = _ext.load()
needs_roofline = pytest.mark.skipif(C is None or not hasattr(C, "roofline_fma_gflops"),
                                    reason="pynas._C is not built (or predates the roofline micro-benchmarks)")


@needs_roofline
@pytest.mark.parametrize("threads", [1, 2])
def test_micro_benchmarks_return_positive_finite_numbers(threads):
    gflops = C.roofline_fma_gflops(threads, 0.005)
    assert math.isfinite(gflops) and gflops > 0
    for nbytes in (4096, 3 * 2 ** 18 + 64):  # the smallest buffer, and one that does not split evenly
        gbs = C.roofline_copy_gbs(nbytes, threads, 0.002)
        assert math.isfinite(gbs) and gbs > 0


@needs_roofline
@pytest.mark.parametrize("call, name", [
    (lambda: C.roofline_fma_gflops(0, 0.01), "threads"),
    (lambda: C.roofline_fma_gflops(-3, 0.01), "threads"),
    (lambda: C.roofline_fma_gflops(100000, 0.01), "threads"),
    (lambda: C.roofline_fma_gflops(1, 0.0), "seconds"),
    (lambda: C.roofline_fma_gflops(1, -1.0), "seconds"),
    (lambda: C.roofline_fma_gflops(1, float("nan")), "seconds"),
    (lambda: C.roofline_fma_gflops(1, 1e6), "seconds"),
    (lambda: C.roofline_copy_gbs(4095, 1, 0.01), "bytes"),
    (lambda: C.roofline_copy_gbs(2 ** 40, 1, 0.01), "bytes"),
    (lambda: C.roofline_copy_gbs(4096, 0, 0.01), "threads"),
    (lambda: C.roofline_copy_gbs(4096, 1, float("inf")), "seconds"),
])
def test_micro_benchmarks_reject_bad_arguments_by_name(call, name):
    with pytest.raises(RuntimeError, match=f": {name}: expected"):
        call()


def test_flops_of_a_1x1_conv_equal_the_hand_count():
    n, cin, cout, h, w = 3, 5, 7, 6, 4
    x = torch.randn(n, cin, h, w, requires_grad=True)
    weight = torch.randn(cout, cin, 1, 1, requires_grad=True)
    fwd = 2 * n * cin * cout * h * w
    flops, moved = bench.measure_flops(lambda: torch.nn.functional.conv2d(x, weight))
    assert flops == fwd
    assert moved == 4 * (x.numel() + weight.numel() + n * cout * h * w)  # x and weight read, y written, once
    # the backward: the input's and the weight's gradients cost a forward each
    conv = lambda: torch.nn.functional.conv2d(x, weight)  # noqa: E731
    assert bench.measure_flops(lambda: torch.autograd.grad(conv().sum(), [x, weight]))[0] == 3 * fwd
    # a depthwise 3x3 conv (groups = channels): each of its gradients costs a forward too
    c = 6
    dw = torch.randn(c, 1, 3, 3, requires_grad=True)
    xd = torch.randn(n, c, h, w, requires_grad=True)
    fwd = 2 * n * c * h * w * 9
    conv = lambda: torch.nn.functional.conv2d(xd, dw, padding=1, groups=c)  # noqa: E731
    assert bench.measure_flops(conv)[0] == fwd
    assert bench.measure_flops(lambda: torch.autograd.grad(conv().sum(), [xd, dw]))[0] == 3 * fwd
    assert bench.measure_flops(lambda: torch.autograd.grad(conv().sum(), [dw]))[0] == 2 * fwd
    # elementwise work is not counted
    assert bench.measure_flops(lambda: torch.relu(x) * 2 + x)[0] == 0


def test_count_flops_of_the_benchmark_cases():
    tiny = bench.SIZES["tiny"]
    flops, traffic, estimated = bench.count_flops("mixed_sum_fwd", tiny["mixed_sum"], torch.device("cpu"))
    assert (flops, traffic, estimated) == (0, 4 * 4 * 5 * 4, False)  # elementwise: no flops; its known bytes
    flops, traffic, estimated = bench.count_flops("cnn_edge_fwd_bwd", tiny["edge"], torch.device("cpu"))
    # the MixedOp's convs: sep_conv_3x3 and _5x5 (2 depthwise + 2 pointwise each), dil_conv_3x3 and _5x5 (1 + 1):
    # 3 depthwise 3x3, 3 depthwise 5x5, 6 pointwise; forward, then the input's and the weight's gradients
    e = tiny["edge"]
    pixels = e["batch"] * e["image"] ** 2
    dw3, dw5, pw = (2 * pixels * e["C"] * 9, 2 * pixels * e["C"] * 25, 2 * pixels * e["C"] * e["C"])
    assert flops == 3 * (3 * dw3 + 3 * dw5 + 6 * pw)
    assert traffic > 0 and estimated
    with pytest.raises(ValueError, match="bench"):
        bench.count_flops("cnn_search_gdas", tiny["search"], torch.device("cpu"))


@needs_roofline
def test_roofline_rows_at_the_tiny_size():
    names = list(bench.ROOFLINE) + ["cnn_edge_fwd_bwd", "mixed_sum_fwd"]
    cfg = bench.BenchConfig(size="tiny", benchmarks=names, providers=["reference", "pynas"], repeats=1, warmup=0)
    rows = bench.run(cfg, progress=False)
    by = {(r["benchmark"], r["provider"]): r for r in rows}
    for name in bench.ROOFLINE:
        ref = by[name, "reference"]
        assert ref["status"] == "skipped" and "pynas only" in ref["note"]
    fma, copy = by["roofline_fma", "pynas"], by["roofline_copy", "pynas"]
    assert fma["status"] == "ok" and copy["status"] == "ok", (fma["note"], copy["note"])
    assert math.isfinite(fma["gflops"]) and fma["gflops"] > 0 and fma["gflops_fraction"] == 1.0
    assert fma["threads"] == torch.get_num_threads() and f"{fma['threads']} threads" in fma["note"]
    assert math.isfinite(copy["bandwidth_gbs"]) and copy["bandwidth_gbs"] > 0
    assert copy["bytes_moved"] == 2 * bench.SIZES["tiny"]["roofline"]["bytes"] and copy["bandwidth_fraction"] == 1.0
    for provider in ("reference", "pynas"):
        edge = by["cnn_edge_fwd_bwd", provider]
        assert edge["status"] == "ok", edge["note"]
        flops, traffic, _ = bench.count_flops("cnn_edge_fwd_bwd", bench.SIZES["tiny"]["edge"], torch.device("cpu"))
        assert edge["flops"] == flops and edge["traffic_bytes"] == traffic and edge["traffic_estimated"] is True
        assert edge["gflops"] == pytest.approx(flops / edge["median_s"] / 1e9)
        assert edge["gflops_fraction"] == pytest.approx(edge["gflops"] / fma["gflops"])  # the same measured peak
        assert edge["arithmetic_intensity"] == pytest.approx(flops / traffic)
        ms = by["mixed_sum_fwd", provider]
        assert ms["flops"] == 0 and ms["gflops"] == 0 and ms["traffic_bytes"] == ms["bytes_moved"]
        assert ms["traffic_estimated"] is False and ms["bandwidth_fraction"] > 0
    table = bench.format_table(rows)
    assert "GFLOP/s" in table and "GB/s" in table and "% of the FMA peak" in table


def _rows_for_plot():
    common = {"status": "ok", "threads": 2, "device": "test cpu"}
    return [dict(common, benchmark="roofline_fma", provider="pynas", gflops=100.0),
            dict(common, benchmark="roofline_copy", provider="pynas", bandwidth_gbs=20.0),
            dict(common, benchmark="cnn_edge_fwd_bwd", provider="reference", gflops=3.0, arithmetic_intensity=0.9,
                 traffic_estimated=True),
            dict(common, benchmark="cnn_edge_fwd_bwd", provider="pynas", gflops=9.0, arithmetic_intensity=0.9,
                 traffic_estimated=True),
            dict(common, benchmark="mixed_sum_fwd", provider="pynas", gflops=0.0, arithmetic_intensity=0.0,
                 traffic_estimated=False),
            dict(common, benchmark="cnn_edge_fwd_bwd", provider="pynas", gflops=9.0, arithmetic_intensity=0.9,
                 threads=1)]  # another thread count: not against these roofs


@pytest.mark.parametrize("ext", [".png", ".svg"])
def test_plot_roofline_writes_a_picture(tmp_path, ext):
    pytest.importorskip("matplotlib")
    from pynas.plot import plot_roofline

    out = tmp_path / f"roofline{ext}"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows_for_plot()))
    labels = plot_roofline(str(path), str(out))
    assert labels == ["cnn_edge_fwd_bwd / pynas", "cnn_edge_fwd_bwd / reference"]
    assert out.stat().st_size > 1000
    if ext == ".svg":
        assert "<svg" in out.read_text()


def test_plot_roofline_needs_the_roofs(tmp_path):
    from pynas.plot import plot_roofline

    rows = [r for r in _rows_for_plot() if r["benchmark"] != "roofline_copy"]
    with pytest.raises(ValueError, match="roofline_copy"):
        plot_roofline(rows, str(tmp_path / "r.png"))
    with pytest.raises(ValueError, match="output"):
        plot_roofline(_rows_for_plot(), str(tmp_path / "r.pdf"))


def test_cli_plot_roofline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from pynas.cli import main

    rows = tmp_path / "rows.jsonl"
    assert main(["bench", "--size", "tiny", "--benchmarks", "roofline", "--providers", "pynas", "--repeats", "1",
                 "--warmup", "0", "--no-progress", "--out", str(rows)]) == 0
    assert main(["plot-roofline", str(rows), "-o", str(tmp_path / "r.png")]) == 0
    assert "kernel points" in capsys.readouterr().out and (tmp_path / "r.png").stat().st_size > 0
    assert main(["plot-roofline", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "x.png")]) != 0
