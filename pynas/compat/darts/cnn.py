"""Drop-in for the DARTS reference code's CNN ``model_search`` and ``architect``.

Same classes, constructors, methods, submodule names and state_dict layout;
the MixedOps compute through pynas's ops, so ``pynas.use_backend`` switches
the kernels. These are pynas's own classes: only ``Architect`` differs, taking
the reference's ``(model, args)``.
"""
from ...strategies.darts import CNNArchitect as _Architect
from ...strategies.darts import settings_from_args
from ...cnn import OPS, PRIMITIVES, Cell, Genotype, MixedOp, Network

__all__ = ["PRIMITIVES", "OPS", "Genotype", "MixedOp", "Cell", "Network", "Architect"]


class Architect(_Architect):
    """``Architect(model, args)``: reads ``args.momentum, args.weight_decay,
    args.arch_learning_rate, args.arch_weight_decay`` and, optionally, ``args.fd_r``."""

    def __init__(self, model, args):
        super().__init__(model, **settings_from_args(args))
