"""Triton kernels of valor-fast, installed as `valor_fast.kernels`.

One file per op: the plain-PyTorch reference (`<op>_ref`), the Triton kernels, the launcher,
the autograd.Function and a functional entry point.  Dispatch (choosing Triton, CUDA C++ or
torch) lives in `valor_fast.ops`, not here.
"""
