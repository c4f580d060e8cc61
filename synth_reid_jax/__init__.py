"""Synth-ReID in JAX: synthetic-to-real person re-ID by joint image translation and re-ID learning."""

__version__ = "0.1.0"
