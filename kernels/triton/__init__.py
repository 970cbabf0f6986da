"""Triton kernels beside the torch references in `geopeft.kernels`.

Importing this package imports triton; `geopeft.kernels.dispatch` imports it only when
a Triton kernel is about to run (CUDA tensors, or `TRITON_INTERPRET=1` on the CPU), so
`import geopeft` never imports triton. Each launcher has the signature of its torch
reference and is tested against it (`tests/test_kernels_triton.py`, in the interpreter).

Triton reads `TRITON_INTERPRET` when a kernel is decorated, i.e. when a module here is
first imported: set it before that import.
"""
