"""pynas's kernels under other people's DARTS code: :func:`accelerate` finds the mixed ops of a supernet by
what their layers are, proves on a probe that the fused edge computes what they compute, and switches those
(:mod:`pynas.foreign.accelerate`); :class:`pynas.Architect` is the exact second-order step for any model."""
from .accelerate import AccelerationReport, MixedOpVerdict, accelerate, accelerated, deaccelerate

__all__ = ["accelerate", "deaccelerate", "accelerated", "AccelerationReport", "MixedOpVerdict"]
