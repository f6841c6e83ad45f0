"""The DARTS CNN search space: candidate ops, MixedOp, Cell, Network, genotypes, the image data, and the
evaluation network a genotype derives (EvalNetwork)."""
from .genotypes import PUBLISHED, Genotype, derive, from_json, load_genotype, parse_cell, to_json
from .model_eval import EvalNetwork, count_parameters
from .model_search import Cell, MixedOp, Network
from .operations import OPS, PRIMITIVES

__all__ = ["PUBLISHED", "Genotype", "derive", "from_json", "load_genotype", "parse_cell", "to_json", "EvalNetwork",
           "count_parameters", "Cell", "MixedOp", "Network",
           "OPS", "PRIMITIVES"]
