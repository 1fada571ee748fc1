"""simclr: SimCLR self-supervised pretraining, evaluation and embedding from the command line."""

__version__ = "0.1.0"
