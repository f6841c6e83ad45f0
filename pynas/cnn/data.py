"""Datasets for the search: an embedded synthetic image set and CIFAR-10 from disk.

``shapes10`` is generated at run time (no download): 10 classes of 32x32 RGB
images (disc, square, triangle, plus, ring, diamond, three stripe
orientations, checkerboard) with random position, size, frequency, colours
and pixel noise. A small CNN learns it to well above chance in minutes, yet
it is not trivial (disc, square and diamond differ only in their outline).
"""
from __future__ import annotations

import math
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch

SHAPES10_CLASSES = ("disc", "square", "triangle", "plus", "ring", "diamond",
                    "h_stripes", "v_stripes", "d_stripes", "checker")
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


@dataclass
class ImageData:
    """Images (N, 3, H, W) float32, normalised, and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    augment: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def make_shapes10(n: int, seed: int = 0, size: int = 32, noise: float = 0.25) -> ImageData:
    """Generate ``n`` images of the embedded ``shapes10`` set, deterministically from ``seed``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of images, got {n!r}")
    if size < 8:
        raise ValueError(f"size: expected at least 8 pixels, got {size}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    scale = size / 32.0
    cx = (10 + 12 * u(n)) * scale
    cy = (10 + 12 * u(n)) * scale
    s = (5 + 5 * u(n)) * scale
    period = (3 + 4 * u(n)) * scale
    phase = 2 * math.pi * u(n)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy = coords.view(1, size, 1)
    xx = coords.view(1, 1, size)
    dx = xx - cx.view(n, 1, 1)
    dy = yy - cy.view(n, 1, 1)
    r = (dx * dx + dy * dy).sqrt()
    sv = s.view(n, 1, 1)
    pv = period.view(n, 1, 1)
    ph = phase.view(n, 1, 1)
    masks = torch.stack(torch.broadcast_tensors(
        r < sv,
        torch.maximum(dx.abs(), dy.abs()) < sv * 0.85,
        (dy > -sv) & (dy < sv) & (dx.abs() < (dy + sv) * 0.5),
        ((dx.abs() < sv / 3) & (dy.abs() < sv)) | ((dy.abs() < sv / 3) & (dx.abs() < sv)),
        (r < sv) & (r > sv * 0.55),
        (dx.abs() + dy.abs()) < sv * 1.2,
        torch.sin(2 * math.pi * yy / pv + ph) > 0,
        torch.sin(2 * math.pi * xx / pv + ph) > 0,
        torch.sin(2 * math.pi * (xx + yy) / (pv * 1.41) + ph) > 0,
        ((torch.floor((xx + ph) / pv) + torch.floor((yy + ph) / pv)) % 2) == 0,
    ), dim=1)  # (n, 10, H, W)
    mask = masks[torch.arange(n), labels].float().unsqueeze(1)
    fg = u(n, 3, 1, 1)
    bg = u(n, 3, 1, 1)
    # keep foreground and background apart in brightness so every image shows its shape
    close = (fg - bg).abs().mean(dim=1, keepdim=True) < 0.25
    bg = torch.where(close, 1.0 - fg, bg)
    img = mask * fg + (1 - mask) * bg + noise * torch.randn(n, 3, size, size, generator=g)
    img = (img - 0.5) / 0.35
    return ImageData(img.contiguous(), labels.long(), 10, "shapes10", augment=False)


def _find_cifar_dir(data_dir: str) -> str:
    if data_dir is None:
        raise ValueError("data_dir: --data cifar10 needs --data-dir DIR holding the CIFAR-10 python batches")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir: no such directory: {data_dir}")
    for cand in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(cand, "data_batch_1")):
            return cand
    raise FileNotFoundError(
        f"data_dir: {data_dir} holds no CIFAR-10 python batches (data_batch_1..5, test_batch), "
        "neither directly nor under cifar-10-batches-py/")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 python batch holds (dicts, lists, strings, numbers, numpy arrays) and nothing
    else: any other global (a function or class a crafted file would call) is refused, so reading a batch never
    runs code."""

    _ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    })

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy 2 on the numpy.core names of old pickles
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists "
                                     f"and strings")


def _read_cifar_batch(path: str) -> dict:
    with open(path, "rb") as fh:
        entry = _CifarUnpickler(fh, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"expected a dict, got {type(entry).__name__}")
    return entry


def load_cifar10(data_dir: str, train: bool = True) -> ImageData:
    """Read the standard CIFAR-10 python batches from ``data_dir`` and normalise them."""
    root = _find_cifar_dir(data_dir)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data_dir: missing CIFAR-10 batch {path}")
        try:
            entry = _read_cifar_batch(path)
            data = torch.as_tensor(entry["data"], dtype=torch.uint8)
            lab = torch.as_tensor(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except OSError:
            raise
        except Exception as exc:
            raise ValueError(f"data_dir: {path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") \
                from None
        images.append(data.view(-1, 3, 32, 32))
        labels.append(lab.long())
    x = torch.cat(images).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    return ImageData(x.contiguous(), torch.cat(labels), 10, "cifar10", augment=train)


def padding_value(data: ImageData):
    """Per channel, the normalised value of a black pixel (what a crop pads a raw image with), or None for 0."""
    if data.name != "cifar10":
        return None
    return torch.tensor([-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)])


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 4, fill=None) -> torch.Tensor:
    """Random crop with padding ``pad`` and random horizontal flip (the DARTS augmentation). The padding is 0,
    or per channel ``fill`` (a (C,) tensor)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    if fill is not None:
        border = torch.ones(1, 1, h, w, dtype=x.dtype)
        border = 1 - torch.nn.functional.pad(border, (pad, pad, pad, pad))
        padded = padded + border * fill.to(x.dtype).view(1, c, 1, 1)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (oy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (ox.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    flip = torch.rand(n, generator=g) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1, 1)
    idx_c = torch.arange(c).view(1, c, 1, 1)
    return padded[idx_n, idx_c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def batches(data: ImageData, indices: torch.Tensor, batch_size: int, seed: int,
            drop_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches over ``indices``, deterministic in ``seed`` (one seed per epoch)."""
    g = torch.Generator().manual_seed(seed)
    order = indices[torch.randperm(len(indices), generator=g)]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        x = data.images[idx]
        if data.augment:
            x = augment_batch(x, g)
        yield x, data.labels[idx]
