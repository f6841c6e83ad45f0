"""Drop-in for the DARTS reference code's RNN ``model_search``, ``genotypes`` and ``architect``.

Same classes, constructors, methods, submodule names and state_dict layout; the cell's node mix runs
through pynas's fused ops, so ``pynas.use_backend`` switches the kernels. ``Architect`` takes the
reference's ``(model, args)`` (``args.wdecay, args.clip, args.arch_lr, args.arch_wdecay``).
"""
from ...rnn import CONCAT, PRIMITIVES, STEPS, DARTSCellSearch, Genotype, RNNModelSearch
from ...strategies.darts import RNNArchitect as _Architect
from ...strategies.darts import rnn_settings_from_args as settings_from_args

__all__ = ["PRIMITIVES", "STEPS", "CONCAT", "Genotype", "DARTSCellSearch", "RNNModelSearch", "Architect"]


class Architect(_Architect):
    """``Architect(model, args)``: reads ``args.wdecay, args.clip, args.arch_lr, args.arch_wdecay`` and,
    optionally, ``args.fd_r``."""

    def __init__(self, model, args):
        super().__init__(model, **settings_from_args(args))
