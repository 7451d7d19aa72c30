"""Triton kernels with their PyTorch references."""
