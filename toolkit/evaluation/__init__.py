"""Evaluation: text normalisation, exact corpus error counts, and sharded batched generation."""
