"""Private parts of the "triton" MoE backend: the @triton.jit kernels (_kernels.py) and the
measured tile table (configs.py). Import only from ops/backends/triton_moe.py."""
