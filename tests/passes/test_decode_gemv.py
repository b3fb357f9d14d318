"""Decode GEMV form (passes/decode_gemv.py): one-row matmuls against a weight the graph reads become
a float32 product and sum over K. Checked against float64, against the same compile without the
form, for what it must leave alone, and for a weight the user changes after compiling."""
import pytest
import torch
import torch.nn as nn

from mxfp4_compile import backend
from mxfp4_compile.passes import decode_gemv
from recording_backend import RecordingBackend, aten

BF16 = torch.bfloat16


class Attn(nn.Module):
    """q/k/v from one input, o from q (a rewritten matmul feeding the next); K = 2880 like gpt-oss."""
    def __init__(self, h=2880, q=576, kv=288, bias=True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(h, q, bias), nn.Linear(h, kv, bias), nn.Linear(h, kv, bias)
        self.o = nn.Linear(q, h, bias=False)

    def forward(self, x):
        q = self.q(x)
        return self.o(q), self.k(x), self.v(x)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Attn(**kw).to(BF16).eval()


def _x(rows, seed=1, h=2880):
    return torch.randn(rows, 1, h, generator=torch.Generator().manual_seed(seed)).to(BF16)


def _compile(m, x, **options):
    torch._dynamo.reset()  # every test compiles Attn.forward anew (the recompile limit)
    rec = RecordingBackend()
    with torch.no_grad():
        out = torch.compile(m, backend=rec, dynamic=False, options=options)(x)
    return out, rec


def _f64(m, x):
    """Each output from float64 math. o's input q: rounded to bf16 as in eager, or not: Inductor
    fuses q's bias and cast into o's reduction and keeps float32 there (as it does for any
    pointwise op it fuses) -> o is compared with both, the closer counts."""
    d = lambda lin, t: torch.nn.functional.linear(  # noqa: E731
        t.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    with torch.no_grad():
        q = d(m.q, x)
        return (d(m.o, q.to(BF16)), d(m.o, q)), d(m.k, x), d(m.v, x)


def _rel(a, b):
    if isinstance(b, tuple):
        return min(_rel(a, r) for r in b)
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("bias", [True, False])
def test_one_row_rewritten_and_rounded_once(bias):
    m, x = _model(bias=bias), _x(1)
    out, rec = _compile(m, x, decode_gemv=True)
    rec.assert_counts(before={aten.addmm: 3 if bias else 0, aten.mm: 1 if bias else 4},
                      after={aten.addmm: 0, aten.mm: 0})
    assert backend.last_compile_info[-1]["decode_gemvs"] == 4
    ref = _f64(m, x)
    for o, r in zip(out, ref):
        # float32 products and sum, one rounding: within bf16's half ulp of the float64 result
        # (rel-L2 of a correctly rounded bf16 vector is ~2^-9 / sqrt(3))
        assert _rel(o, r) < 2.5e-3, _rel(o, r)
        assert o.dtype == BF16 and o.shape == (r[0] if isinstance(r, tuple) else r).shape
    base, _ = _compile(m, x, decode_gemv=False)
    for o, b, r in zip(out, base, ref):  # no worse than the matmul it replaces
        assert _rel(o, r) <= 1.1 * _rel(b, r) + 1e-4


def test_rows_up_to_the_limit(monkeypatch):
    monkeypatch.setattr(decode_gemv, "DEFAULT", decode_gemv.Limits(max_rows=4, min_n=256,
                                                                  max_elements=64 << 20))
    m = _model()
    for rows, n in ((3, 4), (5, 0)):
        x = _x(rows, seed=rows)
        out, rec = _compile(m, x, decode_gemv=True)
        assert backend.last_compile_info[-1]["decode_gemvs"] == n
        for o, r in zip(out, _f64(m, x)):
            assert _rel(o, r) < 2.5e-3
            assert o.is_contiguous()
    x = _x(3)
    torch._dynamo.mark_dynamic(x, 0)  # a symbolic row count: may exceed the limit at run time
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend=RecordingBackend(), options={"decode_gemv": True})(x)
    assert backend.last_compile_info[-1]["decode_gemvs"] == 0


def test_left_alone():
    """Two rows (the default limit is one), a small N (a router), fp32."""
    m = _model()
    _, rec = _compile(m, _x(2), decode_gemv=True)
    assert backend.last_compile_info[-1]["decode_gemvs"] == 0
    rec.assert_counts(after={aten.addmm: 3})
    _, rec = _compile(_model(q=256, kv=128), _x(1), decode_gemv=True)
    assert backend.last_compile_info[-1]["decode_gemvs"] == 2  # q (256) and o, not k, v (128)
    m32 = Attn().eval()
    _compile(m32, _x(1).float(), decode_gemv=True)
    assert backend.last_compile_info[-1]["decode_gemvs"] == 0


def test_auto_is_off_on_cpu_and_bad_values_named():
    m, x = _model(), _x(1)
    _, rec = _compile(m, x)
    assert backend.last_compile_info[-1]["decode_gemvs"] == 0
    rec.assert_counts(after={aten.addmm: 3, aten.mm: 1})
    assert decode_gemv.limits_for(torch.device("cpu")) is None
    with pytest.raises(ValueError, match=r"options\['decode_gemv'\] must be 'auto', True or False"):
        backend.resolve_options(options={"decode_gemv": "yes"})


def test_user_weight_update_is_read():
    """The weight stays a graph input (no copy): an in-place change reaches the next call."""
    m, x = _model(), _x(1)
    torch._dynamo.reset()
    with torch.no_grad():
        f = torch.compile(m, backend="mxfp4", dynamic=False, options={"decode_gemv": True})
        f(x)
        assert backend.last_compile_info[-1]["decode_gemvs"] == 4
        m.q.weight.mul_(-2)
        m.k.bias.add_(1)
        out = f(x)
    for o, r in zip(out, _f64(m, x)):
        assert _rel(o, r) < 2.5e-3
