"""Torch reference ops: the CPU and XLA path, and the oracle the Triton kernels are tested against.

Each op is a pure function of tensors and static sizes: no host syncs and no data-dependent shapes,
so a step's forward compiles with `torch.compile(fullgraph=True)` and can be captured in a CUDA graph.
"""
