"""The search loop every method shares (``loop``), its settings' checks (``config``), checkpoints
(``checkpoint``), curvature tracking (``hessian``), and one search per space (``cnn``, ``rnn``)."""
from .checkpoint import CHECKPOINT_NAME, atomic_save, checkpoint_checksum, load_checkpoint
from .cnn import CNNSearch, CNNSearchConfig, run_search
from .config import HessianSettings
from .loop import LOG_NAME, RunFolder, SearchCheckpoints, prepare_search, start_or_resume
from .rnn import RNNSearch, RNNSearchConfig, run_rnn_search

__all__ = ["CHECKPOINT_NAME", "LOG_NAME", "atomic_save", "checkpoint_checksum", "load_checkpoint", "CNNSearch",
           "CNNSearchConfig", "run_search", "HessianSettings", "RunFolder", "SearchCheckpoints", "prepare_search",
           "start_or_resume", "RNNSearch", "RNNSearchConfig", "run_rnn_search"]
