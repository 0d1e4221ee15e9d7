"""Triton kernels, each with its pure-PyTorch reference in the same file."""
