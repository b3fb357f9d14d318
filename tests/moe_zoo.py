"""MoE models for the compiler tests: small hand-written forms, and builders for models nobody here
wrote (OpenAI's gpt-oss reference MLPBlock, transformers 5.x MoE families) from tiny configs.

Shape legend: T tokens, E experts, k experts per token, H hidden, I intermediate."""
from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import mxfp4_compile  # noqa: F401  (registers the ops and the "mxfp4" backend)
from mxfp4_compile import numerics
from recording_backend import RecordingBackend, mxfp4

E, K, H, I = 4, 2, 64, 32


# ---- hand-written forms --------------------------------------------------------------------------
def _router(x, gate, k):
    p = F.softmax(gate(x).float(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(x.dtype), ids


def swiglu_oai(h, alpha=1.702, limit=7.0):
    gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


class GatherMoE(nn.Module):
    """Per-token gather + einsum (gpt-oss reference style); ``transposed`` stores [E, K, N]."""

    def __init__(self, activation="swiglu_oai", bias=True, transposed=False, limit=7.0, hidden=H,
                 inter=I, k=K, router=None):
        super().__init__()
        self.gate = nn.Linear(hidden, E, bias=False)
        s13 = (E, hidden, 2 * inter) if transposed else (E, 2 * inter, hidden)
        s2 = (E, inter, hidden) if transposed else (E, hidden, inter)
        self.w13, self.w2 = nn.Parameter(torch.randn(s13) * .05), nn.Parameter(torch.randn(s2) * .05)
        self.b13 = nn.Parameter(torch.randn(E, 2 * inter) * .05) if bias else None
        self.b2 = nn.Parameter(torch.randn(E, hidden) * .05) if bias else None
        self.activation, self.transposed, self.limit = activation, transposed, limit
        self.inter, self.k = inter, k
        self.router = router or _router  # (x, gate, k) -> (weights [T, k], ids [T, k])

    def forward(self, x):  # x [T, H]
        w, ids = self.router(x, self.gate, self.k)
        t, I = self.transposed, self.inter
        h = torch.einsum("tkho,th->tko" if t else "tkoh,th->tko", self.w13[ids], x)
        if self.b13 is not None:
            h = h + self.b13[ids]
        if self.activation == "swiglu_oai":
            a = swiglu_oai(h, limit=self.limit)
        elif self.activation == "silu_glu":
            a = F.silu(h[..., :I]) * h[..., I:]
        else:  # gelu GLU: not an activation the op has
            a = F.gelu(h[..., :I]) * h[..., I:]
        y = torch.einsum("tkih,tki->tkh" if t else "tkhi,tki->tkh", self.w2[ids], a)
        if self.b2 is not None:
            y = y + self.b2[ids]
        return torch.einsum("tkh,tk->th", y, w)


class GptFastMoE(nn.Module):
    """gpt-fast Mixtral style: separate w1 (gate) / w3 (up) / w2 stacks, einsum on gathered weights."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, I, H) * .05)
        self.w2 = nn.Parameter(torch.randn(E, H, I) * .05)
        self.w3 = nn.Parameter(torch.randn(E, I, H) * .05)

    def forward(self, x):
        w, ids = _router(x, self.gate, K)
        x1 = F.silu(torch.einsum("ti,taoi->tao", x, self.w1[ids]))
        x3 = torch.einsum("ti,taoi->tao", x, self.w3[ids])
        out = torch.einsum("tao,taio->tai", x1 * x3, self.w2[ids])
        return torch.einsum("tai,ta->ti", out, w)


class DenseMoE(nn.Module):
    """Every expert on every token, then the dense [T, E] routing mask."""

    def __init__(self, bias=False, combine="einsum", topk=True):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * I, H) * .05)
        self.w2 = nn.Parameter(torch.randn(E, H, I) * .05)
        self.b13 = nn.Parameter(torch.randn(E, 2 * I) * .05) if bias else None
        self.b2 = nn.Parameter(torch.randn(E, H) * .05) if bias else None
        self.combine, self.topk = combine, topk

    def forward(self, x):
        p = F.softmax(self.gate(x), dim=-1)
        if self.topk:
            w, ids = torch.topk(p, K, dim=-1)
            dw = torch.zeros_like(p).scatter(1, ids, w / w.sum(-1, keepdim=True))
        else:
            dw = p
        h = torch.einsum("th,enh->etn", x, self.w13)
        if self.b13 is not None:
            h = h + self.b13[:, None, :]
        a = F.silu(h[..., :I]) * h[..., I:]
        y = torch.einsum("eti,ehi->eth", a, self.w2)
        if self.b2 is not None:
            y = y + self.b2[:, None, :]
        if self.combine == "einsum":
            return torch.einsum("eth,te->th", y, dw)
        return (y * dw.t().unsqueeze(-1)).sum(0)


class InputWeightedMoE(nn.Module):
    """Llama 4's MoE (transformers' Llama4TextMoe, written out): a top-k sigmoid router whose
    dense [T, E] scores scale every expert's *input*, all experts as one bmm over E ([E, H, 2I]
    weights, gate/up halves), the E outputs summed unweighted, a shared expert added.
    ``spelling``: "repeat" (transformers') or "expand" (x broadcast over E); ``fill``: the
    scores of unpicked experts before the sigmoid (-inf: weight 0)."""

    def __init__(self, k=1, bias=False, spelling="repeat", shared=True, fill=float("-inf")):
        super().__init__()
        self.k, self.spelling, self.fill = k, spelling, fill
        self.router = nn.Linear(H, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, H, 2 * I) * .05)
        self.down_proj = nn.Parameter(torch.randn(E, I, H) * .05)
        self.b13 = nn.Parameter(torch.randn(E, 2 * I) * .05) if bias else None
        self.b2 = nn.Parameter(torch.randn(E, H) * .05) if bias else None
        self.shared = nn.Sequential(nn.Linear(H, I, bias=False), nn.SiLU(),
                                    nn.Linear(I, H, bias=False)) if shared else None

    def forward(self, x):
        x = x.reshape(-1, H)
        logits = self.router(x)
        top_v, top_i = torch.topk(logits, self.k, dim=1)
        scores = torch.full_like(logits, self.fill).scatter_(1, top_i, top_v)
        scores = torch.sigmoid(scores.float()).to(scores.dtype)  # [T, E], 0 where unpicked
        if self.spelling == "repeat":
            rows = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)  # [E*T, H]
            rows = rows.view(E, -1, H)
        else:
            rows = x.unsqueeze(0).expand(E, -1, -1) * scores.t().unsqueeze(-1)  # [E, T, H]
        gate_up = torch.bmm(rows, self.gate_up_proj)
        if self.b13 is not None:
            gate_up = gate_up + self.b13[:, None, :]
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.bmm(up * F.silu(gate), self.down_proj)
        if self.b2 is not None:
            y = y + self.b2[:, None, :]
        routed = y.view(-1, H).reshape(E, -1, H).sum(dim=0)
        if self.shared is None:
            return routed
        out = self.shared(x)
        out.add_(routed)
        return out


def hf_llama4(layers=2, k=1, dtype=torch.bfloat16):
    """transformers' Llama4ForCausalLM from a tiny config (every layer MoE)."""
    transformers = importlib.import_module("transformers")
    cfg = transformers.Llama4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        num_local_experts=4, num_experts_per_tok=k, interleave_moe_layer_step=1)
    torch.manual_seed(0)
    return transformers.Llama4ForCausalLM(cfg).to(dtype).eval()


def _dequant_torch(blocks, scales, lut, dtype):
    """MXFP4 -> float in plain torch ops (low nibble = even element), as a checkpoint loader would."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()   # [E, N, K]
    vals = lut[codes]
    scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)          # [E, N, K]
    return (vals * scale).to(dtype)


class DequantMoE(nn.Module):
    """Weights stored as MXFP4 (uint8 parameters), dequantized in forward, then gather + einsum."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        ref = GatherMoE("swiglu_oai", bias=True).to(dtype)
        self.gate = ref.gate
        p13, s13 = numerics.quantize(ref.w13.detach().float(), "floor")
        p2, s2 = numerics.quantize(ref.w2.detach().float(), "floor")
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.w13_blocks, self.w13_scales = frozen(p13), frozen(s13)
        self.w2_blocks, self.w2_scales = frozen(p2), frozen(s2)
        self.lut = frozen(numerics.E2M1_VALUES.clone().float())
        self.b13, self.b2 = ref.b13, ref.b2
        self.dtype = dtype

    def forward(self, x):
        w13 = _dequant_torch(self.w13_blocks, self.w13_scales, self.lut, self.dtype)
        w2 = _dequant_torch(self.w2_blocks, self.w2_scales, self.lut, self.dtype)
        w, ids = _router(x, self.gate, K)
        h = torch.einsum("beck,bk->bec", w13[ids], x) + self.b13[ids]
        y = torch.einsum("beck,bek->bec", w2[ids], swiglu_oai(h)) + self.b2[ids]
        return torch.einsum("bec,be->bc", y, w)


# ---- models nobody here wrote --------------------------------------------------------------------
def gpt_oss_reference_block(dtype=torch.bfloat16, hidden=64, intermediate=64, experts=4, k=2):
    """OpenAI's gpt-oss reference torch MLPBlock (gpt_oss.torch.model), random weights."""
    model = importlib.import_module("gpt_oss.torch.model")
    cfg = model.ModelConfig(num_experts=experts, experts_per_token=k, hidden_size=hidden,
                            intermediate_size=intermediate)
    torch.manual_seed(0)
    m = model.MLPBlock(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
        m.norm.scale.fill_(1.0)
    return m.to(dtype).eval()


# family -> (config class, model class, config overrides); tiny: 1-2 layers, H 64, 4 experts
HF_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                     layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=32,
                         q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                         head_dim=16, n_shared_experts=1)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def hf_model(family, experts_implementation, dtype=torch.bfloat16, layers=2, **overrides):
    transformers = importlib.import_module("transformers")
    cfg_name, model_name, kw = HF_FAMILIES[family]
    kw = dict(kw)
    if "layer_types" in kw:
        kw["layer_types"] = (kw["layer_types"] * layers)[:layers]
    kw.update(overrides)
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    cfg = getattr(transformers, cfg_name)(**base)
    cfg._experts_implementation = experts_implementation
    torch.manual_seed(0)
    m = getattr(transformers, model_name)(cfg).to(dtype).eval()
    return m


def token_ids(T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, T), generator=g)


# ---- helpers -------------------------------------------------------------------------------------
def qdq(w: torch.Tensor, k_dim: int, rounding="floor") -> torch.Tensor:
    """Quantize to MXFP4 along ``k_dim`` and back: the values the compiled model computes with."""
    t = w.detach().float().transpose(k_dim, -1)
    k = t.shape[-1]
    t = F.pad(t, (0, -k % 32)).contiguous()  # zero padding to whole blocks, as the transform does
    packed, scales = numerics.quantize(t, rounding)
    out = numerics.dequantize(packed, scales, torch.float32)[..., :k]
    return out.transpose(k_dim, -1).to(w.dtype)


def quantize_experts_(model, k_dims: dict):
    """In place: each named expert parameter -> its MXFP4 round trip ({name: K dim})."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in k_dims:
                p.copy_(qdq(p, k_dims[leaf]))
    return model


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def moe_calls(code: str) -> int:
    return code.count("torch.ops.mxfp4.moe.default(")


class Compiled(NamedTuple):
    out: torch.Tensor        # the compiled model's output (logits for transformers models)
    code: str                # Inductor's generated code
    rec: RecordingBackend    # each compiled graph before and after the MoE pass


def compile_record(model, *inputs, **compile_kwargs) -> Compiled:
    """A fresh torch.compile with the mxfp4 backend (recorded) run once under no_grad."""
    from torch._inductor.utils import run_and_get_code
    rec = RecordingBackend()
    torch._dynamo.reset()
    with torch.no_grad():
        cm = torch.compile(model, backend=rec, **compile_kwargs)
        out, code = run_and_get_code(lambda: cm(*inputs))
    return Compiled(logits(out), "\n".join(code), rec)


def compile_run(model, *inputs, **compile_kwargs):
    """-> (output, generated code) of a fresh torch.compile(backend="mxfp4") under no_grad."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    with torch.no_grad():
        cm = torch.compile(model, backend="mxfp4", **compile_kwargs)
        out, code = run_and_get_code(lambda: cm(*inputs))
    return logits(out), "\n".join(code)


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---- graph snapshots -----------------------------------------------------------------------------
SNAPSHOT_TORCH = "2.13.0"


def snapshot_torch_ok() -> bool:
    return torch.__version__.split("+")[0] == SNAPSHOT_TORCH


def record_pass_graphs(model, *inputs, **compile_kwargs):
    """Compile and return [(graph before the MoE pass, after)] as text, one pair per graph."""
    return compile_record(model, *inputs, **compile_kwargs).rec.texts()


def check_rewrite_numerics(model, inputs, k_dims, n_moe, tight=2e-2, **compile_kwargs):
    """Compiled model: ``n_moe`` op calls, no weight transform in the output code, output equal to
    eager-with-the-same-quantized-weights (tight) and within MXFP4's own error of the bf16 model.
    -> the Compiled (output, code, and the graphs before and after the MoE pass)."""
    import copy
    with torch.no_grad():
        ref = logits(model(*inputs))
        qmodel = quantize_experts_(copy.deepcopy(model), k_dims)
        ref_q = logits(qmodel(*inputs))
    c = compile_record(model, *inputs, **compile_kwargs)
    out, code, rec = c
    assert moe_calls(code) == n_moe, f"{moe_calls(code)} torch.ops.mxfp4.moe calls, want {n_moe}"
    assert rec.count(mxfp4.moe) == n_moe, rec.texts()
    assert "prepare_moe_weights" not in code, "the weight transform runs at every call"
    err_q = rel_err(ref_q, ref)  # MXFP4's own error on these weights
    assert rel_err(out, ref_q) < tight, (rel_err(out, ref_q), err_q)
    assert rel_err(out, ref) < 1.25 * err_q + tight, (rel_err(out, ref), err_q)
    return c


# ---- sort-by-expert + grouped GEMM ----------------------------------------------------------------
def grouped_experts(x, ids, w, w13, w2, *, histc_int=False, fallback=False):
    """Sorted rows + grouped GEMM with offsets, written from the ops' semantics (x [T, H], ids/w
    [T, k], w13 [E, 2I, H], w2 [E, H, I]); silu_glu. histc_int: count on int (the CUDA spelling)."""
    T, k = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat)
    xs = x[perm // k]
    counts = torch.histc(sorted_ids.int() if histc_int else sorted_ids.float(), bins=E, min=0, max=E - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    mm = (lambda a, b: torch.ops.transformers.grouped_mm_fallback(a, b, offs)) if fallback else \
        (lambda a, b: torch._grouped_mm(a, b, offs=offs))
    h = mm(xs, w13.transpose(-2, -1))
    gate, up = h.chunk(2, dim=-1)
    y = mm(F.silu(gate) * up, w2.transpose(-2, -1))
    y = y * w.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inv].view(T, k, -1).sum(dim=1)


class GroupedMoE(nn.Module):
    def __init__(self, fallback=False):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * I, H) * .05)
        self.w2 = nn.Parameter(torch.randn(E, H, I) * .05)
        self.fallback = fallback

    def forward(self, x):
        w, ids = _router(x, self.gate, K)
        return grouped_experts(x, ids, w, self.w13, self.w2, fallback=self.fallback)


class TitanStyleMoE(nn.Module):
    """torchtitan's token-choice MoE structure, written from its semantics: sigmoid router, argsort
    of the flat ids, gather of token rows, counts from histc of the unsorted ids, separate w1/w3/w2
    grouped GEMMs, scatter_add onto zeros or a shared expert's output."""

    def __init__(self, score_before_experts=False, shared=True):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, I, H) * .05)
        self.w2 = nn.Parameter(torch.randn(E, H, I) * .05)
        self.w3 = nn.Parameter(torch.randn(E, I, H) * .05)
        self.shared = nn.Linear(H, H, bias=False) if shared else None
        self.score_before_experts = score_before_experts

    def forward(self, x):  # [T, H]
        scores = torch.sigmoid(self.gate(x).float())
        top, ids = torch.topk(scores, K, dim=1)
        counts = torch.histc(ids.view(-1).float(), bins=E, min=0, max=E)  # CPU histc needs float
        order = torch.argsort(ids.view(-1), stable=True)
        top_sorted = top.view(-1)[order]
        rows = (order // K).reshape(-1, 1).expand(-1, x.shape[1])
        routed = torch.gather(x, dim=0, index=rows)
        if self.score_before_experts:
            routed = (routed.float() * top_sorted.reshape(-1, 1)).to(x.dtype)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(routed, self.w1.transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(routed, self.w3.transpose(-2, -1), offs=offs)
        y = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offs)
        out = self.shared(x) if self.shared is not None else torch.zeros_like(x)
        if not self.score_before_experts:
            y = (y.float() * top_sorted.reshape(-1, 1)).to(x.dtype)
        return out.scatter_add(dim=0, index=rows, src=y)


# more families, built through AutoConfig with one set of tiny overrides (unknown keys are ignored
# by the families that do not use them): what "any family on the experts interface" means here
MORE_HF_FAMILIES = ("granitemoe", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "minimax",
                    "flex_olmo", "exaone_moe", "solar_open", "afmoe")
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, first_k_dense_replace=0,
             decoder_sparse_step=1, mlp_only_layers=[], n_group=1, topk_group=1, moe_layer_freq=1,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_model_auto(family, experts_implementation, dtype=torch.bfloat16):
    transformers = importlib.import_module("transformers")
    cfg = transformers.AutoConfig.for_model(family, **_TINY)
    cfg._experts_implementation = experts_implementation
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def experts_modules(model):
    """transformers experts modules (the ones use_experts_implementation decorated)."""
    return [m for m in model.modules() if isinstance(getattr(m, "down_proj", None), nn.Parameter)
            and hasattr(m, "is_transposed")]


class DequantBufferMoE(DequantMoE):
    """DequantMoE with the packed blocks/scales as module buffers and the e2m1 table built in
    forward, next to a buffer the forward mutates (a step counter): the packed weights fold, the
    counter stays a live input."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__(dtype)
        for name in ("w13_blocks", "w13_scales", "w2_blocks", "w2_scales"):
            t = getattr(self, name).data
            delattr(self, name)
            self.register_buffer(name, t)
        del self.lut
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.steps.add_(1)
        lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
        w13 = _dequant_torch(self.w13_blocks, self.w13_scales, lut, self.dtype)
        w2 = _dequant_torch(self.w2_blocks, self.w2_scales, lut, self.dtype)
        w, ids = _router(x, self.gate, K)
        h = torch.einsum("beck,bk->bec", w13[ids], x) + self.b13[ids]
        y = torch.einsum("beck,bek->bec", w2[ids], swiglu_oai(h)) + self.b2[ids]
        return torch.einsum("bec,be->bc", y, w)
