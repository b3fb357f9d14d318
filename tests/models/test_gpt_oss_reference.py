"""OpenAI's gpt-oss reference torch model (gpt_oss.torch.model), tiny config, random weights:
its MLPBlock and the whole Transformer, compiled as a user would."""
import pytest
import torch

import moe_zoo as z

model_mod = pytest.importorskip("gpt_oss.torch.model")
pytestmark = pytest.mark.slow  # compiles whole reference models

K_DIMS = {"mlp1_weight": -1, "mlp2_weight": -1}


def test_mlp_block():
    m = z.gpt_oss_reference_block()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    z.check_rewrite_numerics(m, (x,), K_DIMS, n_moe=1)


def test_transformer_every_layer():
    cfg = model_mod.ModelConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2,
                                vocab_size=128, hidden_size=64, intermediate_size=64, head_dim=64,
                                num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    torch.manual_seed(0)
    m = model_mod.Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.05)
    m.eval()
    tokens = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(1))
    z.check_rewrite_numerics(m, (tokens,), K_DIMS, n_moe=2, tight=3e-2)
