"""Private parts of the "triton" MoE kernel: the @triton.jit kernels (_kernels.py) and the
measured tile table (configs.py). Import only from ops/kernels/triton_moe.py."""
