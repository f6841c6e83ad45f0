"""The DARTS CNN search space: candidate ops, MixedOp, Cell, Network, genotypes, the image data."""
from .genotypes import Genotype, derive, from_json, parse_cell, to_json
from .model_search import Cell, MixedOp, Network
from .operations import OPS, PRIMITIVES

__all__ = ["Genotype", "derive", "from_json", "parse_cell", "to_json", "Cell", "MixedOp", "Network",
           "OPS", "PRIMITIVES"]
