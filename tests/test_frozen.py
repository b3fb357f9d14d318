"""What the backend freezes (frozen.select) and how frozen expert weights stay current after the user
changes them (frozen.WeightWatch + the store in ops/weights.py): every change either takes effect
at the next call or raises an error that names the tensor."""
import copy

import pytest
import torch
import torch.nn as nn

import moe_zoo as z
import mxfp4_compile
from mxfp4_compile import frozen
from mxfp4_compile.ops import weights

BF16 = torch.bfloat16
KD = {"w13": -1, "w2": -1}


def x(T=5):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(BF16)


class Stack(nn.Module):
    """Two MoE layers with residuals: one change must re-prepare one layer, not both."""

    def __init__(self, make=z.GatherMoE):
        super().__init__()
        self.layers = nn.ModuleList([make(), make()])

    def forward(self, h):
        for layer in self.layers:
            h = h + layer(h)
        return h


def expected(model, *inputs, k_dims=KD):
    """Eager output with the model's CURRENT expert weights quantized the way the compiler does."""
    with torch.no_grad():
        return z.quantize_experts_(copy.deepcopy(model), k_dims)(*inputs)


def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="mxfp4", options=options or None)


def lifted_names(model, *inputs):
    """Source names of the placeholders frozen.select picks for ``model``'s graph."""
    picked = []

    def spy(gm, example_inputs):
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        picked.extend(frozen.source_name(phs[i]._dynamo_source) for i in frozen.select(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=spy)(*inputs)
    return picked


# ---------------------------------------------------------------------------------- what is frozen
@pytest.mark.parametrize("make,want", [
    (lambda: z.GatherMoE(), {"w13", "b13", "w2", "b2"}),
    (lambda: z.GptFastMoE(), {"w1", "w3", "w2"}),
    (lambda: z.DenseMoE(bias=True), {"w13", "b13", "w2", "b2"}),
    (lambda: z.DequantMoE(), {"w13_blocks", "w13_scales", "w2_blocks", "w2_scales", "lut", "b13", "b2"}),
])
def test_select_freezes_expert_weights_only(make, want):
    torch.manual_seed(0)
    m = make().to(BF16)
    names = lifted_names(m, x())
    assert {n.split("'")[-2] for n in names} == want  # never the router's gate.weight


def test_select_leaves_non_moe_models_alone():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(z.H, z.H)
            self.emb = nn.Parameter(torch.randn(3, z.H, z.H))  # 3-D, but only ever used whole
            self.register_buffer("scale", torch.ones(()))
            self.register_buffer("step", torch.zeros((), dtype=torch.int64))

        def forward(self, h):
            return self.lin(h) * self.scale + self.step + self.emb.sum(0)[0]

    assert lifted_names(Plain().to(BF16), x()) == []


# ---------------------------------------------------------------------------- changes take effect
@pytest.fixture(params=[True, False], ids=["prepack", "no-prepack"])
def prepack(request):
    """CPU mkldnn weight prepacking on and off (it packs frozen Linear weights: none are frozen
    now, so both must behave alike)."""
    import torch._inductor.config as ic
    with ic.patch({"cpp.weight_prepack": request.param}):
        yield request.param


def test_inplace_update_of_one_layer_reprepares_that_layer_only(prepack):
    torch.manual_seed(0)
    m = Stack().to(BF16)
    cm = compiled(m)
    with torch.no_grad():
        assert z.rel_err(cm(x()), expected(m, x())) < 2e-2
        n = weights.quantization_count()
        m.layers[1].w2.mul_(-2)                 # an expert weight
        assert z.rel_err(cm(x()), expected(m, x())) < 2e-2  # same input, same T: no recompile needed
        assert weights.quantization_count() - n == 1
        m.layers[0].b13.add_(0.5)               # an expert bias
        m.layers[0].gate.weight.mul_(-1)        # the router: not frozen at all
        assert z.rel_err(cm(x()), expected(m, x())) < 2e-2
        assert weights.quantization_count() - n == 2
        assert z.rel_err(cm(x()), expected(m, x())) < 2e-2  # nothing changed: nothing re-prepared
        assert weights.quantization_count() - n == 2


def test_load_state_dict_takes_effect_for_every_weight(prepack):
    torch.manual_seed(0)
    m, other = Stack().to(BF16), Stack().to(BF16)
    cm = compiled(m)
    with torch.no_grad():
        cm(x())
        m.load_state_dict(other.state_dict())
        assert z.rel_err(cm(x()), expected(other, x())) < 2e-2
        assert z.rel_err(cm(x(9)), expected(other, x(9))) < 2e-2  # and in a recompile for a new T


def test_data_assignment_and_dtype_round_trip_take_effect():
    torch.manual_seed(0)
    m = z.GatherMoE().to(BF16)
    cm = compiled(m)
    with torch.no_grad():
        cm(x())
        m.w13.data = torch.randn_like(m.w13) * 0.05   # a storage swap: the version counter stays
        assert z.rel_err(cm(x()), expected(m, x())) < 2e-2
        m.w2.data.mul_(4)                     # in place through .data: PyTorch counts nothing ...
        m.half().to(BF16)                     # ... but this storage swap is seen (values rounded)
        assert z.rel_err(cm(x()), expected(m, x())) < 2e-2


def test_writes_through_data_need_refresh_weights():
    torch.manual_seed(0)
    m = z.GatherMoE().to(BF16)
    cm = compiled(m)
    with torch.no_grad():
        before = cm(x())
        m.w2.data.mul_(-1)                    # bypasses the version counter, like autograd
        assert torch.equal(cm(x()), before)   # documented: not seen ...
        assert mxfp4_compile.refresh_weights(m) == 1
        assert z.rel_err(cm(x()), expected(m, x())) < 2e-2  # ... until refresh_weights


def test_check_weights_off_skips_the_check():
    torch.manual_seed(0)
    m = z.GatherMoE().to(BF16)
    cm = compiled(m, check_weights=False)
    with torch.no_grad():
        before = cm(x())
        m.w2.mul_(-1)
        assert torch.equal(cm(x()), before)


def test_separate_gate_up_recompiles_reuse_and_release_keeps_working():
    """gpt-fast w1/w3: the transform takes the parameters themselves, so a new T neither quantizes
    again nor (with release_bf16_weights) reads the released zeros."""
    torch.manual_seed(0)
    m = z.GptFastMoE().to(BF16)
    k = {"w1": -1, "w2": -1, "w3": -1}
    want = {T: expected(m, x(T), k_dims=k) for T in (5, 9, 1)}
    cm = compiled(m, release_bf16_weights=True)
    n = weights.quantization_count()
    with torch.no_grad():
        for T in (5, 5, 9, 1):
            assert z.rel_err(cm(x(T)), want[T]) < 2e-2, T
    assert weights.quantization_count() - n == 1
    assert m.w1.untyped_storage().nbytes() <= 2  # released, and no check tripped over it
    with torch.no_grad():  # a released weight given new values takes effect too
        m.w2.data = torch.randn(z.E, z.H, z.I, dtype=BF16) * 0.05
        ref = copy.deepcopy(m)
        for name in ("w1", "w3"):
            getattr(ref, name).data = torch.zeros(getattr(m, name).shape, dtype=BF16)
        assert z.rel_err(cm(x(5)), expected(ref, x(5), k_dims=k)) < 2e-2


def test_int_buffers_the_caller_updates_stay_live():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(z.H, z.H)
            self.register_buffer("offset", torch.zeros((), dtype=torch.int64))

        def forward(self, h):
            return self.lin(h) + self.offset

    m = Counter()
    cm = compiled(m)
    with torch.no_grad():
        a = cm(x().float())
        m.offset.fill_(3)
        assert torch.allclose(cm(x().float()) - a, torch.full_like(a, 3.0))


def test_changing_a_frozen_input_of_a_folded_dequant_is_an_error():
    torch.manual_seed(0)
    m = z.DequantMoE()
    cm = compiled(m)
    with torch.no_grad():
        cm(x())
        m.w2_scales.add_(1)
        with pytest.raises(RuntimeError, match=r"w2_scales.*changed after torch.compile.*reset"):
            cm(x())


def test_store_is_bounded_by_live_source_tensors():
    torch.manual_seed(0)
    m = z.GatherMoE().to(BF16)
    cm = compiled(m)
    with torch.no_grad():
        cm(x())
        size = weights.cache_size()
        for _ in range(5):
            m.w2.mul_(1.5)
            cm(x())
        assert weights.cache_size() == size
    del cm, m
    torch._dynamo.reset()
    import gc
    gc.collect()
    assert weights.cache_size() < size


def test_parameters_left_as_inputs_are_static_for_cuda_graphs():
    """Inductor's freezing path marks no input static; the backend marks the parameters and
    buffers it did not freeze (as stock Inductor does), so CUDA graphs do not copy them each
    replay. The forward input stays a copied (non-static) input."""
    from unittest import mock
    import torch._inductor.compile_fx as cfx
    seen, orig = [], cfx.compile_fx_inner

    def spy(gm, example_inputs, **kw):
        seen.append((len(example_inputs), kw.get("static_input_idxs")))
        return orig(gm, example_inputs, **kw)

    torch.manual_seed(0)
    m = Stack().to(BF16)
    torch._dynamo.reset()
    with mock.patch.object(cfx, "compile_fx_inner", spy), torch.no_grad():
        torch.compile(m, backend="mxfp4")(x())
    # inputs after freezing: layers.0.gate.weight, x, layers.1.gate.weight (experts are frozen)
    assert seen == [(3, [0, 2])]


@pytest.mark.parametrize("source,name", [
    ("L['self']._modules['layers']._modules['0']._parameters['w2']", "layers.0.w2"),
    ("L['self']._modules['moe'].__dict__['_parameters']['w13']", "moe.w13"),
    ("G['model']._modules['moe']._buffers['blocks']", "model.moe.blocks"),
    ("L['w13']", "w13"),
    ("something(else)", "something(else)"),  # unparsed: as given
])
def test_qualified_names(source, name):
    assert frozen.qualified_name(source) == name
