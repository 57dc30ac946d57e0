"""alignloop: the RLHF loop for language models and classifiers, end to end."""

__version__ = "0.1.0"
