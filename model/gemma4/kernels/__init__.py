"""Triton kernels of the hot path, one file per op, each behind a torch reference op in `gemma4.ops`.

Every kernel module registers its launches as `torch.library` custom ops (so `torch.compile` and
CUDA graphs treat them as single nodes), exposes Python launchers with the reference op's
signature, and lists the configurations it ships (`shipped_configs()`), which `gemma4.kernels.aot`
compiles for sm_90 and gfx942 and checks against the devices' limits. Which implementation runs is
decided in one place, `gemma4.backends`.

On a CPU the kernels run through Triton's interpreter (`TRITON_INTERPRET=1`, set before this package
is imported), in fp32: bf16 arithmetic is wrong there, so kernels cast to fp32 right after loading.
"""
