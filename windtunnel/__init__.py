"""windtunnel: a muP hyperparameter wind tunnel."""
__version__ = "0.1.0"
