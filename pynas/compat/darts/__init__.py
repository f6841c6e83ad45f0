"""Drop-in modules for the DARTS reference code: ``cnn`` and ``rnn`` replace its ``model_search`` and ``architect``."""
