"""Drop-in modules for the DARTS reference code: ``cnn`` replaces its ``model_search`` and ``architect``."""
