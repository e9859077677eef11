"""fastdiff's Triton kernels, one per file, each with its reference beside it.

Installed as ``fastdiff.triton_kernels`` (Triton's own repository publishes a top-level
``triton_kernels`` package; ours must not collide with it). Only ``fastdiff.ops`` imports these.
"""
