"""The benchmark suite's plumbing, on the smoke size (no timing is asserted)."""
import json
import subprocess
import sys
import time

import pytest
import torch

from pynas import bench


def test_graph_bytes_counts_what_stays_allocated():
    held = bench.graph_bytes(lambda: torch.empty(2 ** 18) * 2 + 1, torch.device("cpu"))
    assert held == 2 ** 20  # one float32 MiB survives; the temporaries are freed


def test_deadline_interrupts():
    with pytest.raises(bench.CompileTimeout):
        with bench.deadline(0.2):
            t = time.time()
            while time.time() - t < 5:
                pass


def test_interleaved_timing_takes_turns_keeps_each_random_sequence_and_survives_a_failure():
    import contextlib
    import random

    log, draws, entered = [], {"a": [], "b": [], "c": []}, []

    def call(name, fail_at=None):
        def fn():
            log.append(name)
            draws[name].append((torch.rand(1).item(), random.random()))
            if fail_at is not None and len(draws[name]) == fail_at:
                raise ValueError("boom")
        return fn

    @contextlib.contextmanager
    def context(name):
        entered.append(name)
        yield

    cpu = torch.device("cpu")
    calls = []
    for name, seed in (("a", 1), ("b", 2), ("c", 1)):
        torch.manual_seed(seed)
        random.seed(seed)
        calls.append(bench.Timed(call(name, fail_at=4 if name == "c" else None), lambda n=name: context(n),
                                 bench._rng_state(cpu)))
    torch.manual_seed(99)
    bench.time_interleaved(calls, cpu, repeats=4, warmup=1)
    a, b, c = calls
    assert len(a.times) == len(b.times) == 4 and all(t >= 0 for t in a.times + b.times)
    assert isinstance(c.error, ValueError) and len(c.times) == 2  # its 4th call raised: the others went on
    # warm-up of each, then rounds whose order turns by one: a b c, b c a, c(raises) a b, then (a, b) turned: b a
    assert log == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b", "b", "a"]
    assert entered == log
    # each provider drew what it draws alone from its own seed, whatever ran between its calls
    torch.manual_seed(1)
    random.seed(1)
    alone = [(torch.rand(1).item(), random.random()) for _ in range(5)]
    assert draws["a"] == alone and draws["c"] == alone[:4]
    assert draws["b"] != alone[:5]


def test_run_times_a_benchmarks_providers_together_on_a_cpu(monkeypatch):
    seen = []
    real = bench.time_interleaved

    def spy(calls, device, repeats, warmup, min_repeat_s=0.0):
        seen.append((len(calls), repeats))
        return real(calls, device, repeats, warmup, min_repeat_s)

    monkeypatch.setattr(bench, "time_interleaved", spy)
    cfg = bench.BenchConfig(size="tiny", benchmarks=["mixed_sum_fwd", "rnn_search_first_order"],
                            providers=["reference", "pynas"], warmup=0)
    rows = bench.run(cfg, progress=False)
    assert seen == [(2, 20), (2, bench.RNN_REPEATS)]
    assert [r["status"] for r in rows] == ["ok"] * 4 and all(r["repeats"] == n for r, n in zip(rows, (20, 20, 11, 11)))


def test_run_rows_and_ratios():
    cfg = bench.BenchConfig(size="tiny", providers=["reference", "pynas", "pynas-cuda"], repeats=2, warmup=1)
    rows = bench.run(cfg, progress=False)
    assert len(rows) == len(bench.BENCHMARKS) * 3
    for row in rows:
        assert set(bench.ROW_FIELDS) <= set(row)
        assert row["device_type"] == "cpu" and row["torch"] == torch.__version__
        if row["provider"] == "pynas-cuda" and not torch.cuda.is_available():
            assert row["status"] == "skipped" and "cuda" in row["note"]
            continue
        if row["benchmark"] in bench.DATA_PARALLEL:  # pynas on 1 and 2 processes; the 2-process row against the 1
            if row["provider"] != "pynas":
                assert row["status"] == "skipped" and "pynas only" in row["note"]
                continue
            assert row["status"] == "ok", row["note"]
            assert "iterations/s" in row["note"] and row["speedup"] > 0
            one = [r for r in rows if r["benchmark"] == row["benchmark"].replace("2proc", "1proc")
                   and r["provider"] == "pynas"][0]
            assert row["speedup"] == pytest.approx(one["median_s"] / row["median_s"])
            continue
        if row["benchmark"] in bench.ROOFLINE:  # the machine's roofs: pynas only, no timing of their own
            if row["provider"] != "pynas":
                assert row["status"] == "skipped" and "pynas only" in row["note"]
                continue
            assert row["status"] == "ok", row["note"]
            assert (row["gflops"] if row["benchmark"] == "roofline_fma" else row["bandwidth_gbs"]) > 0
            continue
        assert row["status"] == "ok", row["note"]
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["ratio"] == pytest.approx(1 / row["speedup"])
        if row["provider"] == "reference":
            assert row["ratio"] == 1.0
        if row["benchmark"] in bench.FLOP_COUNTED:
            assert row["flops"] >= 0 and row["gflops_fraction"] is not None, row["note"]
        if row["benchmark"] in bench.MACRO + bench.METHODS + bench.RNN_METHODS + bench.FOREIGN or row["benchmark"].startswith("cnn_edge"):
            assert row["memory_bytes"] > 0
        else:
            n = 4 * 5 * 4
            expected = {"mixed_sum_fwd": 4 * n, "mixed_sum_bwd": 7 * n, "mixed_sum_fwd_bwd": 11 * n}
            assert row["bytes_moved"] == expected[row["benchmark"]]
            assert row["bandwidth_fraction"] > 0


def test_compile_over_its_time_is_skipped_with_a_note():
    cfg = bench.BenchConfig(size="tiny", benchmarks=["mixed_sum_fwd"], providers=["reference", "compiled"],
                            repeats=1, warmup=0, compile_timeout=0.01)
    rows = bench.run(cfg, progress=False)
    compiled = [r for r in rows if r["provider"] == "compiled"][0]
    assert compiled["status"] == "skipped" and "did not finish" in compiled["note"]
    assert compiled["median_s"] is None


def test_bad_config():
    with pytest.raises(ValueError, match="size"):
        bench.run(bench.BenchConfig(size="huge"), progress=False)
    with pytest.raises(ValueError, match="providers"):
        bench.run(bench.BenchConfig(size="tiny", providers=["fast"]), progress=False)
    with pytest.raises(ValueError, match="benchmarks"):
        bench.run(bench.BenchConfig(size="tiny", benchmarks=["nope"]), progress=False)


def test_cli_bench_appends_rows(tmp_path):
    out = tmp_path / "r.jsonl"
    res = subprocess.run([sys.executable, "-m", "pynas", "bench", "--size", "tiny", "--benchmarks", "mixed_sum",
                          "--providers", "reference,pynas", "--repeats", "2", "--no-progress", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "mixed_sum_fwd_bwd" in res.stdout and "speedup" in res.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["provider"] for r in rows] == ["reference", "pynas"] * 3
    assert all(r["git_sha"] and r["date"] for r in rows)


PROFILER_NOISE = ("USDT", "profiler_start", "profiler_stop", "gpuGetDeviceCount")


def test_cli_bench_keeps_the_terminal_free_of_profiler_noise(tmp_path):
    # graph_bytes runs torch.profiler, whose C++ side (kineto) writes to the process's stderr
    res = subprocess.run([sys.executable, "-m", "pynas", "bench", "--size", "tiny", "--benchmarks", "cnn_edge_fwd_bwd",
                          "--providers", "reference", "--repeats", "1", "--warmup", "0", "--no-progress", "--out",
                          str(tmp_path / "r.jsonl")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for noise in PROFILER_NOISE:
        assert noise not in res.stdout + res.stderr, res.stdout + res.stderr
    assert "cnn_edge_fwd_bwd" in res.stdout
    row = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert row["memory_bytes"] is not None


def test_quiet_fds_captures_c_level_writes_and_passes_the_rest_on(capfd):
    import os

    with bench.quiet_fds():
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(1, b"ERROR:2026-01-01 00:00:00 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n")
        os.write(2, b"a real warning\n")
        print("python text", flush=True)
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "gpuGetDeviceCount" not in out + err
    assert "a real warning" in err and "python text" in out


def test_quiet_fds_restores_the_descriptors_on_error(capfd):
    import os

    with pytest.raises(RuntimeError):
        with bench.quiet_fds():
            os.write(2, b"kept before the error\n")
            raise RuntimeError("boom")
    os.write(2, b"after\n")
    out, err = capfd.readouterr()
    assert "after" in err and "kept before the error" in err
