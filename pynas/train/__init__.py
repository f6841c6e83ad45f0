"""The evaluation phase: train the network a genotype derives from scratch, test it (pynas.train.cnn)."""
from .cnn import CNNTrainConfig, CNNTraining, evaluate_checkpoint, run_training

__all__ = ["CNNTrainConfig", "CNNTraining", "evaluate_checkpoint", "run_training"]
