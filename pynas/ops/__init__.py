"""pynas's fused ops, one module per op: the public function, its plain-PyTorch reference (``*_ref``, the
source of truth), its custom op and autograd, and its table of implementations (``TABLE``, see ._dispatch)."""
from . import cnn_edge, ess_cell, linear_nll, multi_tensor, partial_channel, rnn_cell, rnn_path, sep_conv
from .mixed_sum import mixed_sum, mixed_sum_ref
from .rnn_mix import rnn_mix, rnn_mix_ref

__all__ = ["mixed_sum", "mixed_sum_ref", "rnn_mix", "rnn_mix_ref", "cnn_edge", "ess_cell", "rnn_cell", "rnn_path",
           "multi_tensor", "sep_conv", "partial_channel", "linear_nll"]
