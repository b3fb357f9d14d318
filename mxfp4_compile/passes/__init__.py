"""FX passes that turn bf16 MoE expert blocks into torch.ops.mxfp4.moe (one file per MoE form)."""
from .manager import MoERewritePass, take_reports

__all__ = ["MoERewritePass", "take_reports"]
