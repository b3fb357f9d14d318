"""The pass manager: its cache key covers the sources and the options (not the report-only names)."""
from mxfp4_compile.passes import MoERewritePass


def test_uuid_covers_options_not_names():
    a = MoERewritePass("reference", "floor", param_names=["a"])
    assert a.uuid() == MoERewritePass("reference", "floor", param_names=["b"]).uuid()
    assert a.uuid() != MoERewritePass("reference", "round_up").uuid()
    assert a.uuid() != MoERewritePass("triton", "floor").uuid()
    assert isinstance(a.uuid(), str) and len(a.uuid()) == 64
