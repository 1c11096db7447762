"""Triton kernels of guide-fast, installed as `guide_fast.kernels`."""
