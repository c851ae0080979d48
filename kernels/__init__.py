"""Compute kernels: each a plain-PyTorch reference (attention.py, norm.py, ...) with a Triton
implementation of the same signature beside it (attention_triton.py, ...). The runtime calls
them through dispatch.py, which picks Triton on CUDA and the reference elsewhere."""
