"""MXFP4 checkpoints for transformers models: load them without a bf16 copy, quantize a bf16
model once, save it, reload it.

    model = mxfp4_compile.from_pretrained("path/to/gpt-oss-20b", device_map="cuda")
    mxfp4_compile.quantize_(bf16_model); bf16_model.save_pretrained(d)   # then from_pretrained(d)

Loading goes through transformers' own ``from_pretrained`` (shards, device_map, dtype, tied
weights, non-persistent buffers): the model is built on the meta device as usual, with every
experts module replaced by an empty ``Mxfp4Experts`` whose buffers have the checkpoint's names and
shapes, so transformers loads the checkpoint's bytes into them unchanged and never creates the
bf16 expert weights; then each layer is laid out for the kernel. The quantization config is taken
out of the config transformers sees: its own "mxfp4" quantizer would fetch kernels from the hub
(or dequantize to bf16), and a foreign quantizer cannot take that name over.

Formats read (config.json ``quantization_config.quant_method``):
  "mxfp4"           gpt-oss as OpenAI publishes it: ``*.mlp.experts.{gate_up_proj,down_proj}_{blocks,
                    scales,bias}`` (experts.py has the shapes)
  "mxfp4_compile"   what ``save_pretrained`` writes for a model this package converted: the same
                    tensors (names per experts.ExpertsSpec), the record below in
                    ``quantization_config``, and config ``dtype`` set to a string that names this
                    package, so that transformers without it fails at once ("module 'torch' has
                    no attribute 'mxfp4_compile: ...'") instead of initialising experts at random
                    (it only warns about an unknown quant_method).
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time

import torch
from torch import nn

from . import formats
from .experts import ExpertsSpec, Mxfp4Experts, hf_experts, spec_of
from .ops import dispatch, weights

log = logging.getLogger("mxfp4_compile")

QUANT_METHOD = "mxfp4_compile"
OPENAI_METHOD = "mxfp4"
FORMAT_VERSION = 1
# config.json "dtype" of a saved model: transformers without this package raises on it
DTYPE_GUARD = "mxfp4_compile: load with mxfp4_compile.from_pretrained"

_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "BF16": torch.bfloat16,
                       "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint this package cannot load; the message names the file and tensor."""


# ---- the checkpoint on disk ------------------------------------------------------------------------
def _local_dir(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the checkpoint's directory (config.json and "
                              f"*.safetensors)")
    try:  # a hub id: the cached snapshot (offline with HF_HUB_OFFLINE=1), else a download
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:
        raise CheckpointError(f"{path} is not a local directory and could not be fetched from the "
                              f"hub ({e!r})") from e


def read_header(file: str) -> dict[str, dict]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets), checked against the
    file's size: a truncated shard is an error naming it, before anything loads."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors header "
                                  f"(truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{file}: header of {n} bytes but the file has {size}: truncated")
        try:
            table = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{file}: unreadable safetensors header ({e})") from e
    table.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in table.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: its tensors need {8 + n + end} bytes but the file has {size}: "
                              f"truncated (re-download or re-save it)")
    return table


def checkpoint_tensors(path: str) -> dict[str, tuple[str, dict]]:
    """tensor name -> (file, header entry) over every shard (the index, or one model.safetensors)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        weight_map, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors.index.json or model.safetensors")
    out = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{file} is listed in {index} but missing")
        for key, entry in read_header(file).items():
            out[key] = (file, entry)
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in out:
                raise CheckpointError(f"{key}: listed in {index} (in {name}) but not in that file")
    return out


def check_experts_tensors(tensors: dict, spec: ExpertsSpec, n_layers: int, path: str) -> None:
    """Every experts layer's tensors present with the spec's shapes and dtypes, else an error that
    names the tensor and its file (or the index, for a missing one)."""
    expect = spec.checkpoint_tensors(torch.bfloat16)
    first = next(iter(expect))
    prefixes = sorted(k[: -len(first)] for k in tensors if k.endswith("." + first) or k == first)
    if len(prefixes) != n_layers:
        raise CheckpointError(f"{path}: {len(prefixes)} tensors named *.{first} for the model's "
                              f"{n_layers} MoE layers ({', '.join(prefixes[:3]) or 'none found'})")
    for prefix in prefixes:
        for name, (shape, dtype) in expect.items():
            key = prefix + name
            if key not in tensors:
                raise CheckpointError(f"{key} is missing from {path} (the layer has {prefix + first}); "
                                      f"an MXFP4 experts layer needs {', '.join(expect)}")
            file, entry = tensors[key]
            got_dtype = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
            ok_dtype = got_dtype == torch.uint8 if dtype == torch.uint8 else \
                isinstance(got_dtype, torch.dtype) and got_dtype.is_floating_point
            if tuple(entry["shape"]) != shape or not ok_dtype:
                raise CheckpointError(f"{key} in {file}: {entry['dtype']} {entry['shape']}, expected "
                                      f"{'U8' if dtype == torch.uint8 else 'a float dtype'} "
                                      f"{list(shape)} for {spec.num_experts} experts, H={spec.hidden_size}, "
                                      f"I={spec.intermediate_size}")


def _read_config(path: str) -> tuple[dict, dict]:
    """-> (config dict for transformers, the quantization record)."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(f"{path}: no config.json")
    with open(file) as f:
        cfg = json.load(f)
    qc = cfg.pop("quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == OPENAI_METHOD:
        record = {"quant_method": OPENAI_METHOD}
    elif method == QUANT_METHOD:
        record = dict(qc)
        if record.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{file}: mxfp4_compile format_version {record.get('format_version')}, "
                                  f"this version reads {FORMAT_VERSION}")
        cfg["dtype"] = record.get("dtype", "bfloat16")
        cfg.pop("torch_dtype", None)
    else:
        raise CheckpointError(f"{file}: quantization_config.quant_method is {method!r}; "
                              f"mxfp4_compile.from_pretrained loads {OPENAI_METHOD!r} (gpt-oss) and "
                              f"{QUANT_METHOD!r} checkpoints (for bf16 models use transformers' "
                              f"from_pretrained, then mxfp4_compile.quantize_)")
    return cfg, record


# ---- the config a converted model carries ----------------------------------------------------------
_config_classes: dict[type, type] = {}


def _mark_config(config, record: dict) -> None:
    """``config.mxfp4_compile = record``, and its class swapped for a subclass whose JSON (what
    save_pretrained writes) carries the record as quantization_config and ``DTYPE_GUARD`` as its
    dtype. In memory the config keeps its real dtype and no quantization_config (transformers
    would look for a quantizer)."""
    base = type(config)
    if base not in _config_classes.values():  # not marked yet
        if base not in _config_classes:
            _config_classes[base] = _json_subclass(base)
        config.__class__ = _config_classes[base]
    config.mxfp4_compile = record


def _json_subclass(base: type) -> type:
    """``base`` with a ``to_json_string`` that writes the record and ``DTYPE_GUARD`` (same name)."""
    def to_json_string(self, use_diff: bool = True) -> str:
        d = json.loads(base.to_json_string(self, use_diff))
        rec = dict(d.pop("mxfp4_compile", None) or self.mxfp4_compile)
        rec["dtype"] = str(d.pop("dtype", d.pop("torch_dtype", rec.get("dtype", "bfloat16"))))
        rec["dtype"] = rec["dtype"].replace("torch.", "")
        d["quantization_config"] = rec
        d["dtype"] = DTYPE_GUARD
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    return type(base.__name__, (base,), {"to_json_string": to_json_string, "__module__": base.__module__})


def _record(spec: ExpertsSpec, rounding: str | None, n_layers: int) -> dict:
    return dict(quant_method=QUANT_METHOD, format_version=FORMAT_VERSION, rounding=rounding,
                num_moe_layers=n_layers, **spec.record())


# ---- quantize_ -------------------------------------------------------------------------------------
def _progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="layer", leave=False, disable=None)


def quantize_(model: nn.Module, *, rounding: str = "floor", kernel: str = "auto") -> nn.Module:
    """Replace every transformers experts module of ``model`` (bf16, fp16 or fp32) by
    ``Mxfp4Experts``, in place, layer by layer (each layer's float weights are freed as soon as it
    is converted). ``model.save_pretrained(d)`` then writes the MXFP4 checkpoint that
    ``from_pretrained(d)`` reloads. -> model."""
    formats.check_rounding(rounding)
    formats.check_kernel(kernel)
    found = hf_experts(model)
    if not found:
        raise ValueError(f"quantize_: {type(model).__name__} has no transformers experts module (a "
                         f"class transformers' use_experts_implementation decorates); for other model "
                         f"code use torch.compile(model, backend='mxfp4'), which quantizes at compile time")
    specs = {name: spec_of(m) for name, m in found}
    first = next(iter(specs.values()))
    if any(s.activation != first.activation or s.has_bias != first.has_bias for s in specs.values()):
        raise ValueError("quantize_: the model's experts layers differ in activation or bias; one "
                         "checkpoint record cannot describe them")
    t0 = time.perf_counter()
    bar = _progress(len(found), "mxfp4: quantizing MoE layers")
    for name, m in found:
        spec = specs[name]
        w13 = m.gate_up_proj
        kname = dispatch.choose_kernel(w13.device)[0] if kernel == "auto" else kernel
        with torch.no_grad():  # not the store (cache=False): these weights are about to go
            prepared = weights.prepare_moe_weights(
                w13.detach(), m.down_proj.detach(), getattr(m, "gate_up_proj_bias", None),
                getattr(m, "down_proj_bias", None), activation=spec.activation, kernel=kname,
                rounding=rounding, gate_up_interleaved=not m.is_concatenated,
                transposed=bool(m.is_transposed), cache=False)
        bias_dtype = m.gate_up_proj_bias.dtype if spec.has_bias else w13.dtype
        new = Mxfp4Experts.from_prepared(spec, prepared, kernel, bias_dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        del m, w13
        bar.update(1)
    bar.close()
    config = getattr(model, "config", None)
    if config is not None:
        _mark_config(config, _record(first, rounding, len(found)))
    log.info("mxfp4: quantized %d MoE layer(s) of %s to MXFP4 in %.1f s (kernel layout %s)",
             len(found), type(model).__name__, time.perf_counter() - t0, new.kernel)
    return model


# ---- from_pretrained -------------------------------------------------------------------------------
def _model_class(config, model_class):
    import transformers
    if model_class is not None:
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM._model_mapping[type(config)]


def _loading_class(base: type, kernel: str, spec: ExpertsSpec):
    """``base`` with a constructor that swaps each experts module for an empty Mxfp4Experts of
    ``spec`` (what ``_experts_spec`` found every layer to be) right after building it (on the meta
    device, inside transformers' from_pretrained). Same name, nothing else changed; the loaded
    model gets ``base`` back as its class."""
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        for name, _ in hf_experts(self):
            parent, _, attr = name.rpartition(".")
            setattr(self.get_submodule(parent), attr, Mxfp4Experts(spec, kernel))
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def _experts_spec(base: type, config, path: str) -> tuple[ExpertsSpec, int]:
    """The experts spec and MoE layer count of ``base(config)``, built on the meta device."""
    with torch.device("meta"):
        skeleton = base(config)
    found = hf_experts(skeleton)
    if not found:
        raise CheckpointError(f"{path}: {base.__name__} has no transformers experts module to load "
                              f"MXFP4 weights into")
    specs = {spec_of(m) for _, m in found}
    if len(specs) != 1:
        raise CheckpointError(f"{path}: {base.__name__}'s experts layers differ ({specs})")
    return specs.pop(), len(found)


def from_pretrained(path, *, kernel: str = "auto", model_class=None, **kwargs) -> nn.Module:
    """Load an MXFP4 checkpoint (module docstring: gpt-oss's, or one this package saved) into its
    transformers model class, offline when ``path`` is a directory; the experts are
    ``Mxfp4Experts`` laid out for ``kernel`` ("auto": what their device picks). Other keyword
    arguments go to transformers' ``from_pretrained`` (``device_map``, ``dtype``, ...)."""
    import transformers

    formats.check_kernel(kernel)
    for bad in ("quantization_config", "config", "output_loading_info"):
        if bad in kwargs:
            raise TypeError(f"from_pretrained: {bad}= is set by mxfp4_compile.from_pretrained itself")
    t0 = time.perf_counter()
    path = _local_dir(path)
    cfg_dict, record = _read_config(path)
    model_type = cfg_dict.get("model_type")
    try:
        config_class = type(transformers.AutoConfig.for_model(model_type))
    except Exception as e:
        raise CheckpointError(f"{path}/config.json: model_type {model_type!r} is not one this "
                              f"transformers ({transformers.__version__}) knows ({e})") from e
    config = config_class.from_dict(cfg_dict)
    base = _model_class(config, model_class)
    tensors = checkpoint_tensors(path)  # every shard's header: truncation, before loading
    spec, n_layers = _experts_spec(base, config, path)
    check_experts_tensors(tensors, spec, n_layers, path)
    if record["quant_method"] == QUANT_METHOD:
        saved = {k: record.get(k) for k in ("num_experts", "hidden_size", "intermediate_size",
                                            "activation", "has_bias")}
        mine = {k: getattr(spec, k) for k in saved}
        if saved != mine:
            raise CheckpointError(f"{path}/config.json records experts {saved} but "
                                  f"{base.__name__} builds {mine}")
    elif spec.activation != "swiglu_oai":
        raise CheckpointError(f"{path}: quant_method {OPENAI_METHOD!r} is gpt-oss's format, but "
                              f"{base.__name__}'s experts compute {spec.activation}")
    kwargs.setdefault("local_files_only", True)
    model, info = _loading_class(base, kernel, spec).from_pretrained(path, config=config,
                                                                     output_loading_info=True, **kwargs)
    model.__class__ = base
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, Mxfp4Experts)]
    unloaded = [k for k in info.get("missing_keys", ()) if any(k.startswith(n + ".") for n, _ in experts)]
    if unloaded:
        raise CheckpointError(f"{path}: transformers did not load {', '.join(sorted(unloaded)[:4])}")
    bar = _progress(len(experts), "mxfp4: laying out MoE layers")
    for _, m in experts:
        m.adopt()
        bar.update(1)
    bar.close()
    _mark_config(model.config, _record(spec, record.get("rounding"), len(experts)))
    log.info("mxfp4: loaded %s from %s: %d MXFP4 MoE layer(s), kernel layout %s, in %.1f s",
             base.__name__, path, len(experts), experts[0][1].kernel, time.perf_counter() - t0)
    return model


def set_kernel(model: nn.Module, kernel: str) -> int:
    """Re-lay every Mxfp4Experts of ``model`` out for ``kernel`` ("auto": what each one's device
    picks), e.g. after moving the model. -> how many layers. Compile after this, not before."""
    formats.check_kernel(kernel)
    n = 0
    for m in model.modules():
        if isinstance(m, Mxfp4Experts):
            m.set_kernel(kernel)
            n += 1
    return n
