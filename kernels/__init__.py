"""Compute kernels, each a plain-PyTorch reference (Triton versions arrive with the GPU path)."""
