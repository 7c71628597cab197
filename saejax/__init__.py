"""saejax: many sparse autoencoders trained as one vmapped, sharded JAX program, and matched across seeds."""

__version__ = '0.1.0'
