"""Checks of a search's settings (every space and method), and the settings every search shares.

Each check raises ValueError naming the setting and what it got, so a bad command line, a bad API call and a
checkpoint whose settings were edited all fail the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

SEED_LIMIT = 2 ** 32  # seeds are integers in [0, 2**32): the per-epoch data seeds derived from them fit torch's


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_positive_int(name: str, v, minimum: int = 1) -> int:
    """An int (not a bool) >= ``minimum``; returns it."""
    if not _is_int(v) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}: expected {what}, got {v!r}")
    return v


def check_number(name: str, v, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, what: str = "") -> float:
    """A finite real number within the given bounds (NaN and infinities are refused); returns it as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name}: expected a number, got {v!r}")
    x = float(v)
    ok = math.isfinite(x)
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x < high if high_open else x <= high
    if not ok:
        if low is not None and high is not None:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            span = f"{'<' if high_open else '<='} {high:g}"
        else:
            span = ""
        raise ValueError(f"{name}: expected a finite number{' ' + span if span else ''}{what}, got {v!r}")
    return x


def check_flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name}: expected True or False, got {v!r}")


def check_seed(v) -> None:
    if not _is_int(v) or not 0 <= v < SEED_LIMIT:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {v!r}")


def check_optional_int(name: str, v, minimum: int = 1) -> None:
    if v is not None:
        check_positive_int(name, v, minimum)


def check_hessian_settings(cfg) -> None:
    """The --track-hessian / --hessian-* settings (both search spaces)."""
    check_flag("track_hessian", cfg.track_hessian)
    check_flag("hessian_stop", cfg.hessian_stop)
    for name in ("hessian_iters", "hessian_window", "hessian_k"):
        check_positive_int(name, getattr(cfg, name))
    check_number("hessian_threshold", cfg.hessian_threshold, low=0.0, low_open=True)
    if cfg.hessian_stop and not cfg.track_hessian:
        raise ValueError("hessian_stop: the early stop needs the eigenvalues: add --track-hessian")


def check_place(cfg) -> None:
    for name in ("device", "backend"):
        if not isinstance(getattr(cfg, name), str):
            raise ValueError(f"{name}: expected a string, got {getattr(cfg, name)!r}")


def _weight_optimizer(params, cfg) -> torch.optim.SGD:
    """SGD with momentum and weight decay, torch's fused kernel where it has one (CPU and CUDA): one pass
    over all weights instead of the default foreach kernels' several (the timings of both are in
    benchmarks/results/weight_step.txt). Same update rule, same state_dict."""
    params = list(params)
    kw = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=bool(getattr(cfg, "nesterov", False)))
    try:
        return torch.optim.SGD(params, cfg.learning_rate, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.SGD(params, cfg.learning_rate, **kw)


@dataclass
class HessianSettings:
    """The --track-hessian / DARTS-ES settings, shared by the search configs (check: check_hessian_settings)."""

    track_hessian: bool = False  # the dominant eigenvalue of the arch Hessian after every epoch
    hessian_iters: int = 20  # power iterations (Hessian-vector products) per eigenvalue
    hessian_stop: bool = False  # DARTS-ES: stop by the eigenvalue rule, keep the genotype of hessian_k epochs before
    hessian_window: int = 5  # DARTS-ES: epochs averaged
    hessian_k: int = 5  # DARTS-ES: epochs looked back
    hessian_threshold: float = 0.75  # DARTS-ES: stop when mean(i - k) / mean(i) falls below
