"""The DARTS RNN search space's names (darts-spec.md, "RNN search space")."""
from collections import namedtuple

Genotype = namedtuple("Genotype", "recurrent concat")

#: Candidates in alpha-column order.
PRIMITIVES = ["none", "tanh", "relu", "sigmoid", "identity"]
#: Nodes per cell; the cell's output is the mean of the last CONCAT nodes.
STEPS = 8
CONCAT = 8
