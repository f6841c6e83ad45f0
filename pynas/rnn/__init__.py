"""The DARTS RNN search space: the search cell, the language model, genotypes, the corpora."""
from .genotypes import CONCAT, PRIMITIVES, STEPS, Genotype, derive, from_json, to_json
from .model_search import DARTSCellSearch, LockedDropout, RNNModelSearch, embedded_dropout

__all__ = ["PRIMITIVES", "STEPS", "CONCAT", "Genotype", "DARTSCellSearch", "RNNModelSearch", "LockedDropout",
           "embedded_dropout", "derive", "to_json", "from_json"]
