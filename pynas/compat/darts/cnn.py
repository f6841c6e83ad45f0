"""Drop-in for the DARTS reference code's CNN ``model_search`` and ``architect``.

Same classes, constructors, methods, submodule names and state_dict layout;
the MixedOps compute through pynas's ops, so ``pynas.use_backend`` switches
the kernels. These are pynas's own classes: only ``Architect`` differs, taking
the reference's ``(model, args)``.
"""
from ...architect import Architect as _Architect
from ...cnn import OPS, PRIMITIVES, Cell, Genotype, MixedOp, Network

__all__ = ["PRIMITIVES", "OPS", "Genotype", "MixedOp", "Cell", "Network", "Architect"]


class Architect(_Architect):
    """``Architect(model, args)``: reads ``args.momentum, args.weight_decay,
    args.arch_learning_rate, args.arch_weight_decay`` and, optionally, ``args.fd_r``."""

    def __init__(self, model, args):
        missing = [k for k in ("momentum", "weight_decay", "arch_learning_rate", "arch_weight_decay")
                   if not hasattr(args, k)]
        if missing:
            raise ValueError(f"args: missing {', '.join(missing)}")
        super().__init__(model, momentum=args.momentum, weight_decay=args.weight_decay,
                         arch_learning_rate=args.arch_learning_rate, arch_weight_decay=args.arch_weight_decay,
                         fd_r=getattr(args, "fd_r", 0.01))
