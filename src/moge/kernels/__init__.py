"""Compiled kernels the model layers call where torch has no fast path (CPU decode products)."""
