"""fippure: backdoor purification in JAX/Flax."""

__version__ = "0.1.0"
