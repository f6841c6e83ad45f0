"""The sublayer-order search space of the sandwich transformer (Press, Smith and Levy, ACL 2020).

A candidate is a string over ``{'s', 'f'}`` (self-attention, feed-forward sublayers, in order):
:mod:`.model` builds its language model, :mod:`.orders` draws the paper's families of strings, :mod:`.trial`
trains a candidate for a step budget, resumably.
"""
from .model import (FeedForwardSublayer, SelfAttentionSublayer, SublayerLM, check_order, count_parameters,
                    sublayer_weights)
from .orders import interleaved, random_balanced, random_same_params, sandwich
from .trial import SublayerTrialConfig, train_order

__all__ = ["SublayerLM", "SelfAttentionSublayer", "FeedForwardSublayer", "check_order", "sublayer_weights",
           "count_parameters", "interleaved", "sandwich", "random_balanced", "random_same_params",
           "SublayerTrialConfig", "train_order"]
