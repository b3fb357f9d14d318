"""mxfp4_compile: MXFP4 Mixture-of-Experts inference as one line of torch.compile.

    import mxfp4_compile                      # registers torch.ops.mxfp4.* and the backend
    with torch.no_grad():
        out = torch.compile(model, backend="mxfp4")(x)
"""
from . import ops  # noqa: F401  (registers torch.ops.mxfp4.*; must come before the backend)
from . import backend  # noqa: F401  (registers backend="mxfp4")
from .checkpoints import from_pretrained, quantize_, set_kernel
from .experts import Mxfp4Experts
from .explain import explain
from .formats import Activation, Kernel, Rounding
from .ops import PreparedMoE, from_mxfp4_blocks, prepare_moe_weights
from .ops.dispatch import choose_kernel
from .ops.weights import refresh_weights

__all__ = ["Activation", "Kernel", "Mxfp4Experts", "PreparedMoE", "Rounding", "choose_kernel",
           "explain", "from_mxfp4_blocks", "from_pretrained", "prepare_moe_weights", "quantize_",
           "refresh_weights", "set_kernel"]
