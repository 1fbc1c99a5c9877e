"""Triton kernels of valor-fast, installed as `valor_fast.kernels`.

One file per op: the plain-PyTorch reference (`<op>_ref`) at the top, the Triton kernels, the
launchers, and one autograd path (torch.library.custom_op + register_autograd, eager and under
torch.compile) with a functional entry point.  contrastive.py stops at its launchers: its custom
ops are built by valor_fast.ops.contrastive_op over either kernel backend (Triton here, CUDA C++
in csrc/).  Shared device helpers live in _common.py, the optional triton import in _compat.py.
This package imports nothing from valor_fast outside valor_fast.kernels; dispatch (choosing
Triton, CUDA C++ or torch) lives in `valor_fast.ops`.
"""
