"""Search methods: each one file, each giving the architecture step of a search (the loop is pynas.search).

``darts``: DARTS first and second order, for the CNN and RNN spaces; ``idarts``: I-DARTS (one softmax per node);
``pcdarts``: PC-DARTS (partial channels, edge normalisation); ``gdas``: GDAS (Gumbel-softmax sampled paths);
``rsws``: random search with weight sharing; ``random_search``: the plain random-search baseline; ``enas``: ENAS on
the RNN space (its controller in ``enas_controller``); ``cas`` and ``mas``: continual and multi-task search on
ENAS (their penalties in ``cas_penalties``); ``ess``: ESS's inter-cell search on the RNN space; ``evolution``:
regularized evolution with progressive dynamic hurdles; ``sandwich``: sublayer orders; ``base``: what the
gradient methods share.
"""
from __future__ import annotations

import importlib

#: The methods on the CNN space's supernet: name -> (module, class) (imported on first use).
CNN_METHODS = {
    "darts": ("darts", "DARTSMethod"),
    "idarts": ("idarts", "IDARTSMethod"),
    "pcdarts": ("pcdarts", "PCDARTSMethod"),
    "gdas": ("gdas", "GDASMethod"),
    "rsws": ("rsws", "RSWSMethod"),
}


def cnn_method(name: str):
    """The class of the CNN-space method ``name`` (a :class:`pynas.strategies.base.CNNMethod`)."""
    if name not in CNN_METHODS:
        raise ValueError(f"method: expected one of {', '.join(CNN_METHODS)}, got {name!r}")
    module, cls = CNN_METHODS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
