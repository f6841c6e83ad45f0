"""The DARTS RNN search space (work in progress: the search cell; the model, architect and search loop
come next)."""
from .genotypes import CONCAT, PRIMITIVES, STEPS, Genotype
from .model_search import DARTSCellSearch

__all__ = ["PRIMITIVES", "STEPS", "CONCAT", "Genotype", "DARTSCellSearch"]
