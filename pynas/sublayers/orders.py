"""Families of sublayer orders (strings over ``{'s', 'f'}``, :mod:`pynas.sublayers.model`).

With n the baseline's number of (s, f) pairs, the interleaved baseline ``"sf" * n`` holds 12 n d^2 weights.
Each function is a pure function of its arguments (and of the state of the ``random.Random`` it is given).
"""
from __future__ import annotations

import random

from ..search.config import _is_int, check_positive_int


def _check_n(n) -> int:
    return check_positive_int("n", n)


def _check_rng(rng) -> random.Random:
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng: expected a random.Random, got {type(rng).__name__}")
    return rng


def interleaved(n: int) -> str:
    """The baseline transformer's order: ``"sf" * n`` (n >= 1)."""
    return "sf" * _check_n(n)


def sandwich(n: int, k: int) -> str:
    """The sandwich order of the paper: ``"s" * k + "sf" * (n - k) + "f" * k`` for 0 <= k <= n (n s and n f,
    k = 0 is the interleaved baseline)."""
    _check_n(n)
    if not _is_int(k) or not 0 <= k <= n:
        raise ValueError(f"k: expected an integer in [0, n = {n}], got {k!r}")
    return "s" * k + "sf" * (n - k) + "f" * k


def _arrange(rng: random.Random, n_s: int, n_f: int) -> str:
    """A uniformly random arrangement of ``n_s`` 's' and ``n_f`` 'f' (a shuffle of the multiset)."""
    chars = ["s"] * n_s + ["f"] * n_f
    rng.shuffle(chars)
    return "".join(chars)


def random_balanced(rng: random.Random, n: int) -> str:
    """A uniformly random arrangement of n ``'s'`` and n ``'f'`` (each of the C(2n, n) strings equally likely),
    drawn with ``rng.shuffle``."""
    _check_rng(rng)
    return _arrange(rng, _check_n(n), n)


def random_same_params(rng: random.Random, n: int) -> str:
    """A random order with the baseline's weight count 12 n d^2: n_s + 2 n_f = 3n.

    ``n_f`` is drawn uniformly from 0..floor(3n / 2) (``rng.randint``), ``n_s = 3n - 2 n_f``, then the string is a
    uniformly random arrangement of them (``rng.shuffle``). So every n_f is equally likely, not every string:
    strings with an n_f that has fewer arrangements are each more likely. The string has 3n - n_f >= 1
    sublayers."""
    _check_rng(rng)
    _check_n(n)
    n_f = rng.randint(0, 3 * n // 2)
    return _arrange(rng, 3 * n - 2 * n_f, n_f)
