"""Triton kernels of pynas's fused ops, one module per op (installed as ``pynas.kernels``).

Each module imports triton at its top, so import them lazily, only once a Triton backend
is chosen. Every kernel also runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""
