"""The MXFP4 ops (torch.ops.mxfp4.*), their reference, the kernel dispatch and weight preparation."""
from . import library  # noqa: F401  (registers torch.ops.mxfp4.*)
from .weights import PreparedMoE, from_mxfp4_blocks, prepare_moe_weights

__all__ = ["PreparedMoE", "from_mxfp4_blocks", "prepare_moe_weights"]
