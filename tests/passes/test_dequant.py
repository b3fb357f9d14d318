"""A graph that dequantizes MXFP4 weights then multiplies: the dequant is folded (requantizing the
dequantized values is lossless), so the compiled model computes with exactly the checkpoint's
weights."""
import torch

import moe_zoo as z
from recording_backend import aten, mxfp4

BF16 = torch.bfloat16


def x(T=5):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(BF16)


def _ancestors(node):
    seen, stack = set(), [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def test_dequant_then_matmul_is_folded_and_lossless():
    torch.manual_seed(0)
    m = z.DequantMoE()
    with torch.no_grad():
        ref = m(x())
    out, code, rec = z.compile_record(m, x())
    assert z.moe_calls(code) == 1
    # after the pass the dequantization (two exp2 of the scales) is still in the graph, feeding
    # the weight transform directly: freezing folds both into constants
    rec.assert_counts(before={aten.bmm: 3, aten.exp2: 2, aten.topk: 1},
                      after={aten.bmm: 0, aten.exp2: 2, aten.topk: 0, mxfp4.moe: 1,
                             mxfp4.topk_softmax: 1})
    (run,) = rec.runs
    preps = [n for n in run.after.nodes if n.target is mxfp4.prepare_moe_weights.default]
    assert preps, run.text()
    for p in preps:  # w13 and w2 of each: computed from the dequantized values
        for w in (*p.args[0], p.args[2]):
            assert any(a.target is aten.exp2.default for a in _ancestors(w)), run.text()
    assert "prepare_moe_weights" not in code
    # no weight dequantization left in the output code either (folded at compile time)
    assert "exp2" not in code
    assert z.rel_err(out, ref) < 1e-2  # same weight values: bf16 rounding only


def test_packed_weights_in_buffers_fold_and_mutated_buffer_stays_live():
    torch.manual_seed(0)
    m = z.DequantBufferMoE()
    with torch.no_grad():
        ref = m(x())
    out, code = z.compile_run(m, x())
    assert z.moe_calls(code) == 1 and "prepare_moe_weights" not in code and "exp2" not in code
    assert z.rel_err(out, ref) < 1e-2
    assert m.steps.item() == 2  # eager call + compiled call: the counter buffer was not frozen
