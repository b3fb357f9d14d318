"""MXFP4 checkpoints (checkpoints.py, experts.py): gpt-oss checkpoints written here in the layout
OpenAI publishes (two shards and an index), loaded bit for bit, run eagerly and compiled, against
transformers' own dequantizing load; quantize_ -> save_pretrained -> from_pretrained round trips;
clear errors for broken checkpoints; no network, no bf16 experts."""
import copy
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import moe_zoo as z

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import mxfp4_compile as mc  # noqa: E402
from mxfp4_compile import backend, numerics  # noqa: E402
from mxfp4_compile.bench.checkpoint import write_checkpoint  # noqa: E402
from mxfp4_compile.checkpoints import CheckpointError  # noqa: E402
from mxfp4_compile.experts import Mxfp4Experts  # noqa: E402
from mxfp4_compile.ops import weights  # noqa: E402

CUDA = torch.cuda.is_available()
# gpt-oss-like: H and I not powers of two (2880 in the real model); 2 layers, sliding + full
GPT_OSS = dict(hidden_size=96, intermediate_size=160)


def bf16_model(family, layers=2, **kw):
    """A tiny transformers model with bf16 parameters and float32 rotary tables (as transformers'
    loader leaves them; casting the whole model would round them), expert biases non-zero."""
    over = dict(GPT_OSS) if family == "gpt_oss" else {}
    over.update(kw)
    m = z.hf_model(family, "batched_mm", dtype=torch.float32, layers=layers, **over)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("_bias") and ".experts." in name:
                p.normal_(0, 0.05)
            p.data = p.data.to(torch.bfloat16)
    return m


def openai_tensors(model):
    """A bf16 GptOss model's state -> what OpenAI's checkpoint holds: the experts as MXFP4 blocks
    and scales (gate/up interleaved rows, [E, N, K/32, 16]), bf16 biases, everything else bf16."""
    out = {}
    for name, t in model.state_dict().items():
        head, _, leaf = name.rpartition(".")
        if head.endswith("mlp.experts") and leaf in ("gate_up_proj", "down_proj"):
            w = t.transpose(1, 2).float()  # gpt-oss stores [E, K, N]
            packed, scales = numerics.quantize(w.contiguous())
            out[f"{name}_blocks"] = packed.unflatten(-1, (-1, 16))
            out[f"{name}_scales"] = scales
        else:
            out[name] = t
    return out


def write_openai(path, model, max_shard_bytes=None):
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    tensors = openai_tensors(model)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_checkpoint(str(path), json.loads(json.dumps(cfg, default=str)), tensors.items(),
                     max_shard_bytes or total * 3 // 4)  # two shards
    return tensors


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    m = bf16_model("gpt_oss")
    d = tmp_path_factory.mktemp("gpt_oss")
    tensors = write_openai(d, m)
    return d, m, tensors


def _experts(model):
    return [(n, mod) for n, mod in model.named_modules() if isinstance(mod, Mxfp4Experts)]


def _ids(model, T=7):
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, model.config.vocab_size, (1, T), generator=g)


def test_written_checkpoint_is_two_shards_with_an_index(gpt_oss_dir):
    d, _, tensors = gpt_oss_dir
    index = json.load(open(d / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) == 2
    assert set(index["weight_map"]) == set(tensors)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_gpt_oss_loads_bit_for_bit(gpt_oss_dir, kernel):
    d, _, tensors = gpt_oss_dir
    m = mc.from_pretrained(d, kernel=kernel, dtype=torch.bfloat16)
    experts = _experts(m)
    assert len(experts) == 2 and all(e.kernel == kernel for _, e in experts)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in m.named_parameters()), \
        "bf16 expert weights exist"
    for name, e in experts:
        for key, t in e.checkpoint_state().items():  # the kernel layout inverted
            want = tensors[f"{name}.{key}"]
            assert t.dtype == want.dtype and torch.equal(t, want), f"{name}.{key} differs"
    sd = m.state_dict()
    assert all(torch.equal(sd[k], t) for k, t in tensors.items())


def test_gpt_oss_matches_transformers_dequantizing_load(gpt_oss_dir):
    """Same MXFP4 weights, two implementations: ours (the fused op, float32 math) and
    transformers' own load with Mxfp4Config(dequantize=True) (bf16 experts)."""
    d, bf16, _ = gpt_oss_dir
    ours = mc.from_pretrained(d, dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        d, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16,
        local_files_only=True)
    x = _ids(ours)
    with torch.no_grad():
        a, b, ref = ours(x).logits, theirs(x).logits, bf16(x).logits
    err = z.rel_err(a, b)
    assert err < 2e-2, err
    assert z.rel_err(a, ref) > err, "MXFP4 weights should differ from bf16 more than two MXFP4 paths"


@pytest.mark.slow
def test_gpt_oss_compiled_both_backends(gpt_oss_dir):
    d, _, _ = gpt_oss_dir
    m = mc.from_pretrained(d, dtype=torch.bfloat16)
    x = _ids(m)
    n = len(backend.last_compile_info)
    with torch.no_grad():
        eager = m(x).logits
        ours = torch.compile(m, backend="mxfp4")(x).logits
        torch._dynamo.reset()
        inductor = torch.compile(m)(x).logits
    info = backend.last_compile_info[n:]
    assert sum(i.get("already_mxfp4", 0) for i in info) == 2
    assert sum(i["rewritten"] for i in info) == 0 and all(i["prepared"] == 0 for i in info), \
        "already-MXFP4 experts were re-quantized"
    routers = [c.details.get("router", "") for i in info for c in i["candidates"]]
    assert routers and all(r.startswith("topk_softmax") for r in routers), routers
    assert z.rel_err(ours, eager) < 2e-2 and z.rel_err(inductor, eager) < 2e-2


def test_no_network_and_no_hub_kernels(gpt_oss_dir, monkeypatch):
    d, _, _ = gpt_oss_dir

    def refuse(*a, **k):
        raise AssertionError("network access while loading")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import transformers.integrations.hub_kernels as hk
    if hasattr(hk, "get_kernel"):
        monkeypatch.setattr(hk, "get_kernel", refuse)
    m = mc.from_pretrained(d)
    assert len(_experts(m)) == 2
    assert getattr(m, "hf_quantizer", None) is None  # generate's auto-compile stays possible


# ---- broken checkpoints ------------------------------------------------------------------------------
MISSING = "model.layers.1.mlp.experts.down_proj_scales"
MISSHAPEN = "model.layers.0.mlp.experts.gate_up_proj_blocks"


def _rewrite_shard(dst, index, key, change):
    """Shard holding ``key``: its tensors -> change(tensors), written back."""
    from safetensors.torch import load_file, save_file
    shard = os.path.join(dst, index["weight_map"][key])
    save_file(change(load_file(shard)), shard, metadata={"format": "pt"})


def _drop_tensor(dst, index):
    _rewrite_shard(dst, index, MISSING, lambda t: {k: v for k, v in t.items() if k != MISSING})
    del index["weight_map"][MISSING]
    json.dump(index, open(os.path.join(dst, "model.safetensors.index.json"), "w"))


def _shrink_tensor(dst, index):
    _rewrite_shard(dst, index, MISSHAPEN, lambda t: dict(t, **{MISSHAPEN: t[MISSHAPEN][:, :-2].contiguous()}))


def _truncate_second_shard(dst, index):
    shard = os.path.join(dst, sorted(set(index["weight_map"].values()))[1])
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)


def _foreign_quant_method(dst, index):
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8"}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


@pytest.mark.parametrize("edit,match", [
    (_drop_tensor, MISSING.replace(".", r"\.") + " is missing"),
    (_shrink_tensor, rf"{MISSHAPEN} in .*model-0000\d\.safetensors: U8"),
    (_truncate_second_shard, r"model-00002\.safetensors.*truncated"),
    (_foreign_quant_method, r"quant_method is 'fp8'"),
], ids=["missing scale tensor", "wrong shape", "truncated shard", "foreign quant_method"])
def test_broken_checkpoint_is_named(gpt_oss_dir, tmp_path, edit, match):
    """A copy of the checkpoint with one thing broken: an error naming the tensor and file."""
    bad = tmp_path / "bad"
    shutil.copytree(gpt_oss_dir[0], bad)
    edit(str(bad), json.load(open(bad / "model.safetensors.index.json")))
    with pytest.raises(CheckpointError, match=match):
        mc.from_pretrained(bad)


# ---- quantize_, save, reload ---------------------------------------------------------------------
K_DIMS = {"gpt_oss": {"gate_up_proj": 1, "down_proj": 1}}


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral", "qwen3_moe"])
def test_quantize_save_reload_round_trip(family, tmp_path):
    m = bf16_model(family)
    x = _ids(m)
    with torch.no_grad():
        ref_q = z.quantize_experts_(copy.deepcopy(m), K_DIMS.get(family, {"gate_up_proj": -1,
                                                                          "down_proj": -1}))(x).logits
        mc.quantize_(m)
        out = m(x).logits
    assert len(_experts(m)) == 2
    assert z.rel_err(out, ref_q) < 1e-2, z.rel_err(out, ref_q)  # the same MXFP4 values, fused op
    sd = m.state_dict()
    m.save_pretrained(tmp_path, max_shard_size="40KB")
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "mxfp4_compile"
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) >= 2
    names = ("gate_up_proj", "down_proj") if family == "gpt_oss" else ("gate_up", "down")
    assert any(k.endswith(f"experts.{names[0]}_blocks") for k in sd)
    n_quantized = weights.quantization_count()
    back = mc.from_pretrained(tmp_path)
    assert weights.quantization_count() == n_quantized, "reloading quantized again"
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in back.named_parameters())
    sd2 = back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd), "round trip is not bit-identical"
    with torch.no_grad():
        assert torch.equal(back(x).logits, out)


OTHER_FAMILIES = sorted(set(z.HF_FAMILIES) - {"gpt_oss", "mixtral", "qwen3_moe"}) + list(z.MORE_HF_FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_quantize_every_family(family, tmp_path):
    """Every transformers family the pass knows: quantize_ computes the MXFP4 round trip of its
    experts (found by running its own _apply_gate), and save/reload is bit-identical."""
    m = z.hf_model(family, "batched_mm") if family in z.HF_FAMILIES else z.hf_model_auto(family, "batched_mm")
    kd = 1 if z.experts_modules(m)[0].is_transposed else -1
    x = z.token_ids()
    with torch.no_grad():
        ref_q = z.quantize_experts_(copy.deepcopy(m), {"gate_up_proj": kd, "down_proj": kd})(x).logits
        mc.quantize_(m)
        out = m(x).logits
    assert z.rel_err(out, ref_q) < 1e-2
    m.save_pretrained(tmp_path)
    sd, sd2 = m.state_dict(), mc.from_pretrained(tmp_path).state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_quantize_without_experts_says_what_to_do():
    with pytest.raises(ValueError, match="backend='mxfp4'"):
        mc.quantize_(torch.nn.Linear(4, 4))


@pytest.mark.slow
@pytest.mark.subprocess
def test_plain_transformers_refuses_a_saved_model(tmp_path):
    m = bf16_model("mixtral", layers=1)
    mc.quantize_(m)
    m.save_pretrained(tmp_path)
    code = ("import sys, transformers\n"
            "try:\n"
            f"    transformers.MixtralForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e); sys.exit(3)\n"
            "assert 'mxfp4_compile' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, (r.stdout, r.stderr[-2000:])
    assert "mxfp4_compile: load with mxfp4_compile.from_pretrained" in r.stdout


# ---- moving, re-laying out, state dicts ------------------------------------------------------------
def test_dtype_change_keeps_the_mxfp4_layout(gpt_oss_dir):
    d, _, _ = gpt_oss_dir
    m = mc.from_pretrained(d, dtype=torch.bfloat16)
    x = _ids(m)
    before = {n: e.checkpoint_state() for n, e in _experts(m)}
    m.float()
    for n, e in _experts(m):
        assert e.w13.dtype == torch.uint8 and e.w13_bias.dtype == torch.float32
        after = e.checkpoint_state()
        assert all(torch.equal(after[k].float(), before[n][k].float()) for k in after)
    with torch.no_grad():
        assert torch.isfinite(m(x).logits).all()


def test_set_kernel_relays_without_changing_bits(gpt_oss_dir):
    d, _, tensors = gpt_oss_dir
    m = mc.from_pretrained(d)
    assert mc.set_kernel(m, "triton") == 2
    for name, e in _experts(m):
        assert e.kernel == "triton"
        assert all(torch.equal(t, tensors[f"{name}.{k}"]) for k, t in e.checkpoint_state().items())
    from mxfp4_compile.ops.kernels import flashinfer_moe
    e = _experts(m)[0][1]
    with pytest.raises(ValueError, match="kernel 'flashinfer' cannot be turned back"):
        flashinfer_moe.unprepare(*e._prepared().tensors(), "swiglu_oai")


def test_load_state_dict_writes_in_place(gpt_oss_dir):
    d, _, _ = gpt_oss_dir
    a = mc.from_pretrained(d)
    b = mc.from_pretrained(d)
    e = _experts(b)[0][1]
    ptr = e.w13.data_ptr()
    with torch.no_grad():
        e.w13.zero_()
    x = _ids(a)
    b.load_state_dict(a.state_dict())
    assert e.w13.data_ptr() == ptr
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    sd = a.state_dict()
    sd.pop(next(k for k in sd if k.endswith("down_proj_scales")))
    missing = b.load_state_dict(sd, strict=False).missing_keys
    assert any(k.endswith("down_proj_scales") for k in missing)


def test_generate_eagerly(gpt_oss_dir):
    d, _, _ = gpt_oss_dir
    m = mc.from_pretrained(d)
    x = _ids(m, T=5)
    with torch.no_grad():
        out = m.generate(x, max_new_tokens=4, do_sample=False)
        step = m(x).logits[:, -1].argmax(-1)
    assert out.shape == (1, 9) and out[0, 5] == step[0]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_auto_kernel_follows_the_device(gpt_oss_dir):
    d, _, tensors = gpt_oss_dir
    m = mc.from_pretrained(d, device_map="cuda")
    e = _experts(m)[0][1]
    want = mc.choose_kernel("cuda")[0]
    assert e.kernel == want
    x = _ids(m).cuda()
    with torch.no_grad():
        gpu = m(x).logits.float().cpu()
        m.to("cpu")
        assert e.kernel == "reference"
        cpu = m(x.cpu()).logits.float()
    assert z.rel_err(gpu, cpu) < 2e-2
    name = _experts(m)[0][0]
    assert all(torch.equal(t, tensors[f"{name}.{k}"]) for k, t in e.checkpoint_state().items())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_compiled_with_cuda_graphs(gpt_oss_dir):
    d, _, _ = gpt_oss_dir
    m = mc.from_pretrained(d, device_map="cuda", dtype=torch.bfloat16)
    x = _ids(m).cuda()
    with torch.no_grad():
        eager = m(x).logits
        c = torch.compile(m, backend="mxfp4", mode="reduce-overhead")
        outs = [c(x).logits.clone() for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert z.rel_err(outs[0], eager) < 2e-2
