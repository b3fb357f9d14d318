"""transformers 5.x MoE families from tiny configs (random weights, no downloads), compiled the way a
user would: ``torch.compile(model, backend="mxfp4")`` under ``torch.no_grad()``; every MoE layer
must become one torch.ops.mxfp4.moe call, in both experts implementations."""
import pytest

import moe_zoo as z

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # a tiny transformers model per test: 5-20 s of compiling each

# K dim of each expert weight by parameter name, per family (gpt-oss stores [E, K, N])
K_DIMS = {"gpt_oss": {"gate_up_proj": 1, "down_proj": 1}}
DEFAULT_K = {"gate_up_proj": -1, "down_proj": -1}


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", sorted(z.HF_FAMILIES))
def test_every_moe_layer_rewritten(family, impl):
    m = z.hf_model(family, impl, layers=2)
    n_layers = sum(1 for name, _ in m.named_modules() if name.endswith("mlp.experts"))
    assert n_layers == 2
    z.check_rewrite_numerics(m, (z.token_ids(),), K_DIMS.get(family, DEFAULT_K), n_moe=n_layers,
                             tight=3e-2)


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", z.MORE_HF_FAMILIES)
def test_more_families(family, impl):
    m = z.hf_model_auto(family, impl)
    experts = z.experts_modules(m)
    assert experts, "no experts module found"
    kd = 1 if experts[0].is_transposed else -1
    z.check_rewrite_numerics(m, (z.token_ids(),), {"gate_up_proj": kd, "down_proj": kd},
                             n_moe=len(experts), tight=3e-2)


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", ["gpt_oss", "mixtral", "qwen3_moe"])
def test_one_token_decode(family, impl):
    """B=1, S=1 (a decode step, T=1): the size-1 token dim must not hide which rows the routing
    weights belong to (grouped_mm used to be left in bf16 here)."""
    m = z.hf_model(family, impl, layers=1)
    z.check_rewrite_numerics(m, (z.token_ids(T=1),), K_DIMS.get(family, DEFAULT_K), n_moe=1,
                             tight=3e-2)


@pytest.mark.parametrize("k", [1, 2])
def test_llama4(k):
    """transformers' Llama 4: the routing weights scale the experts' input, every expert runs as
    one bmm over E, a shared expert beside them; each layer one mxfp4.moe(weights_on_input)."""
    m = z.hf_llama4(layers=2, k=k)
    assert all(p.float().std() > 0 for n, p in m.named_parameters() if ".experts." in n)
    c = z.check_rewrite_numerics(m, (z.token_ids(),), {"gate_up_proj": 1, "down_proj": 1}, n_moe=2)
    assert c.code.count("weights_on_input=True") == 2, c.code
