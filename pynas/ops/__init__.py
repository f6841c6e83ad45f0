"""pynas's fused ops. Each op module holds the public function, its plain-PyTorch
reference (``*_ref``, the source of truth) and the dispatch to the backends."""
from .mixed_sum import mixed_sum, mixed_sum_ref
from .rnn_mix import rnn_mix, rnn_mix_ref

__all__ = ["mixed_sum", "mixed_sum_ref", "rnn_mix", "rnn_mix_ref"]
