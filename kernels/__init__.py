"""Triton kernels of mlfd, installed as ``mlfd_kernels`` (a bare ``kernels`` collides with a PyPI package)."""
