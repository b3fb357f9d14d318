"""transformers ``generate`` and a forward the user compiled with backend="mxfp4".

transformers' compile recipe is ``model.forward = torch.compile(model.forward, ...)`` with a
static cache. On CUDA, ``generate`` with a static cache also compiles the decode step itself
(``GenerationMixin.get_compiled_call``: ``torch.compile(self.__call__, **compile_config)``, by
default Inductor with mode="reduce-overhead"). A compiled function called inside another compile
is traced into the outer one, and the inner backend is ignored: every decode step would then run
a graph Inductor compiled alone, with bf16 experts, and only the prefill would run ours.

So, when the backend compiles the forward of a generation model whose ``forward`` is a compiled
function and ``generate`` would wrap it, it sets ``generation_config.disable_compile = True``
(transformers' own switch): ``generate`` then calls the user's compiled forward for every step.
It says so once in the log. A ``compile_config`` the user set with another backend is left alone,
with a warning that decode will not run mxfp4.

Whenever decode runs our compile (either route), ``generate`` on that model may also check for the
end of generation one step late on CUDA (``defer_stop_check``): transformers' ``StopCheck`` reads
``unfinished_sequences.max() == 0`` on the host after every token, a device sync that leaves the
host unable to queue the next step while the GPU runs this one, so every step pays the host's
whole share (generate's input preparation, Dynamo's guards, the CUDA-graph launch) on top of the
GPU's. transformers has the cure, ``DeferredStopCheck`` (the flag is copied asynchronously and read
one step later; the one step run past the end is undone, the cache cropped), but enables it only
on mps. We allow it on CUDA for the models we compile, nothing else (see ``defer_stop_check``).

The same models' decode masks are built without a host sync (``sync_free_masks``): with a static
cache, ``generate`` builds each step's 4-D attention masks in eager before calling the forward, and
transformers' ``eager_mask`` (before 5.25; gpt-oss's attention) makes its 0 with
``torch.tensor(0.0, device=...)``, a copy from pageable host memory that on CUDA waits for the
GPU to finish the previous step, once per mask type, every token.

And their static caches keep one address from one ``generate`` to the next
(``stable_cache_memory``): ``generate`` builds a new ``StaticCache`` per call, whose tensors are
allocated wherever the caching allocator has room. The decode graph writes them in place, so they
are static inputs of its CUDA graph, and a new address makes CUDA graph trees record the graph
again: one re-recording per ``generate`` call (tens of ms at full depth; torch versions that
count such re-recordings toward ``cudagraph_unexpected_rerecord_limit`` stop using CUDA graphs
for the decode after 128 calls). We give each new cache the memory of the last one of the same
shapes whose cache object is gone: after the prefill, which initializes the cache inside its
graph, its tensors are copied there.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import warnings
import weakref

log = logging.getLogger("mxfp4_compile")

_warned = weakref.WeakSet()  # models warned about (ids get reused; weak references do not)


def _frame_self():
    """The object whose method Dynamo is compiling (its first argument), or None."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        names = tx.f_code.co_varnames[: max(tx.f_code.co_argcount, 1)]
        return tx.f_locals.get(names[0]) if names else None
    except Exception:  # outside Dynamo (a direct backend call) or another torch layout
        return None


def _is_ours(backend) -> bool:
    return backend == "mxfp4" or getattr(backend, "__name__", "") == "mxfp4_backend"


def claim_decode() -> str | None:
    """Called by the backend while it compiles a frame: make ``generate`` call that frame's
    compiled forward for decode (see the module docstring). -> what was done, or None."""
    model = _frame_self()
    gc = getattr(model, "generation_config", None)
    if gc is None or not hasattr(model, "get_compiled_call"):
        return None
    cc = getattr(gc, "compile_config", None)
    cc_ours = cc is not None and _is_ours(getattr(cc, "backend", None))
    fwd = getattr(model, "__dict__", {}).get("forward")
    if fwd is None or not hasattr(fwd, "_torchdynamo_orig_callable"):
        if cc_ours:
            _decode_is_ours(model)  # generate's own compile of decode, with our backend
        return None  # not the forward recipe
    if getattr(gc, "disable_compile", False) or cc_ours:
        _decode_is_ours(model)  # decode runs this compiled forward, or generate compiles it with mxfp4
        return None
    if cc is not None:
        if model not in _warned:
            _warned.add(model)
            warnings.warn(
                f"mxfp4 backend: model.forward is compiled with backend='mxfp4', but "
                f"generation_config.compile_config has backend={cc.backend!r}: on CUDA with a static "
                f"cache, generate() compiles the decode step itself with that backend, so decode "
                f"will not run MXFP4. Set generation_config.compile_config = "
                f"CompileConfig(backend='mxfp4', ...) or generation_config.disable_compile = True.",
                stacklevel=3)
        return None
    gc.disable_compile = True
    _decode_is_ours(model)
    msg = ("mxfp4: set generation_config.disable_compile = True on the model whose forward is "
           "compiled with backend='mxfp4': generate() would otherwise trace that forward into its "
           "own torch.compile for decode (default Inductor, bf16 experts)")
    log.info(msg)
    return msg


def _decode_is_ours(model) -> None:
    """``model``'s decode runs our compile: take generate's per-token host syncs off it, and keep
    its static caches at one address."""
    defer_stop_check(model)
    sync_free_masks(model)
    stable_cache_memory(model)


_deferring = weakref.WeakSet()  # models whose generate() may defer its stop check on CUDA


def _asking_model():
    """The ``self`` of the frame that called our wrapper of a transformers function: the model
    whose ``generate`` asks (``_sample`` / ``prepare_inputs_for_generation``)."""
    return sys._getframe(2).f_locals.get("self")


def _enroll(model, models, msg: str) -> None:
    """Add ``model`` to one of the scoped switches' sets, saying so once."""
    if not _member(model, models):
        models.add(model)
        log.info(msg)


def _member(obj, models) -> bool:
    """``obj in models`` for whatever a caller's frame holds as ``self`` (an unhashable object is
    not one of ours, rather than a TypeError inside transformers' generate)."""
    try:
        return obj in models
    except TypeError:
        return False


def _may_defer(device, cache, cache_is_returned, is_assistant, model) -> bool:
    """transformers' own conditions for deferring (a cache that can be rolled back when it is
    returned; never for an assistant model), on CUDA, for a model we compiled."""
    if getattr(device, "type", None) != "cuda" or is_assistant or not _member(model, _deferring):
        return False
    return cache is None or bool(getattr(cache, "is_croppable", False)) or not cache_is_returned


def defer_stop_check(model) -> bool:
    """Let ``generate`` on ``model`` use transformers' ``DeferredStopCheck`` on CUDA (it enables it
    on mps only): no host sync per token, one extra step whose token and cache entries generate
    undoes. Scoped to ``model``: ``DeferredStopCheck.is_supported`` is wrapped once to also answer
    True when the calling ``generate``'s model (its ``self``) is one we compiled, and otherwise
    returns transformers' own answer. Off with MXFP4_DEFER_STOP_CHECK=0. -> whether installed
    (False on transformers without ``DeferredStopCheck``)."""
    if os.environ.get("MXFP4_DEFER_STOP_CHECK", "1") in ("0", ""):
        return False
    try:
        from transformers.generation import utils as gen_utils
    except ImportError:
        return False
    cls = getattr(gen_utils, "DeferredStopCheck", None)
    if cls is None or not callable(getattr(cls, "is_supported", None)):
        return False
    if not getattr(cls.is_supported, "_mxfp4_scoped", False):
        theirs = cls.is_supported

        def is_supported(device, cache, cache_is_returned, is_assistant):
            if theirs(device, cache, cache_is_returned, is_assistant):
                return True
            return _may_defer(device, cache, cache_is_returned, is_assistant, _asking_model())

        is_supported._mxfp4_scoped = True
        cls.is_supported = staticmethod(is_supported)
    _enroll(model, _deferring, "mxfp4: generate() on this model checks for its end one step late "
            "on CUDA (transformers' DeferredStopCheck; no host sync per token)")
    return True


def stop_deferring(model) -> None:
    """Undo ``defer_stop_check`` for ``model`` (its generate syncs every token again)."""
    _deferring.discard(model)


_sync_free = weakref.WeakSet()  # models whose generate() builds its eager masks on the device


@functools.lru_cache(maxsize=None)
def _eager_mask_copies_host_value(masking_utils) -> bool:
    """Whether this transformers' ``eager_mask`` makes its 0 from a host value (a device sync on
    CUDA): 5.17 writes ``torch.tensor(0.0, device=mask.device, dtype=dtype)``, 5.25
    ``torch.zeros((), ...)``."""
    try:
        return "torch.tensor(" in inspect.getsource(masking_utils.eager_mask)
    except (AttributeError, OSError, TypeError):
        return False


def _device_eager_mask(masking_utils):
    """transformers' ``eager_mask`` (its signature and result) with the 0 made on the device."""
    import torch

    def eager_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                   mask_function=masking_utils.causal_mask_function, attention_mask=None,
                   dtype=torch.float32, allow_is_bidirectional_skip=False, use_vmap=False,
                   device="cpu", **kwargs):
        kwargs.pop("allow_is_causal_skip", None)
        mask = masking_utils.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
            allow_is_causal_skip=False, allow_is_bidirectional_skip=allow_is_bidirectional_skip,
            use_vmap=use_vmap, device=device, **kwargs)
        if mask is not None:  # bool -> 0 where attended, the dtype's minimum elsewhere
            zero = torch.zeros((), device=mask.device, dtype=dtype)
            mask = torch.where(mask, zero, torch.finfo(dtype).min)
        return mask

    return eager_mask


def sync_free_masks(model) -> bool:
    """Let ``generate`` on ``model`` build its per-step eager attention masks without a host sync
    (module docstring). transformers' ``generate`` module-level ``create_masks_for_generate`` is
    wrapped once: when the asking model (its ``prepare_inputs_for_generation``'s ``self``) is one
    of ours and the "eager" mask function is transformers' own, that one call sees a copy of
    ``eager_mask`` that makes its 0 on the device (the same values; transformers' mask registry,
    restored after the call). Other models, a user's own "eager" mask function and transformers
    versions whose ``eager_mask`` does not copy a host value are left as they are.
    -> whether ``model``'s masks are now built sync-free."""
    try:
        from transformers import masking_utils as mu
        from transformers.generation import utils as gen_utils
    except ImportError:
        return False
    theirs = getattr(gen_utils, "create_masks_for_generate", None)
    registry = getattr(mu, "ALL_MASK_ATTENTION_FUNCTIONS", None)
    if theirs is None or registry is None or not _eager_mask_copies_host_value(mu):
        return False
    if not getattr(theirs, "_mxfp4_scoped", False):
        ours = _device_eager_mask(mu)

        def create_masks_for_generate(*args, **kwargs):
            if not _member(_asking_model(), _sync_free) or registry["eager"] is not mu.eager_mask:
                return theirs(*args, **kwargs)
            registry["eager"] = ours  # the registry's local override, for this call only
            try:
                return theirs(*args, **kwargs)
            finally:
                del registry["eager"]

        create_masks_for_generate._mxfp4_scoped = True
        gen_utils.create_masks_for_generate = create_masks_for_generate
    _enroll(model, _sync_free, "mxfp4: generate() on this model builds its eager attention masks "
            "on the device (transformers' eager_mask copies a host 0.0 per mask, a sync per token "
            "on CUDA)")
    return True


def host_masks(model) -> None:
    """Undo ``sync_free_masks`` for ``model`` (transformers' own eager masks again)."""
    _sync_free.discard(model)


_stable = weakref.WeakSet()  # models whose generate() keeps its static caches at one address
_settled = weakref.WeakSet()  # caches already moved to (or left out of) their model's pool
_pools = weakref.WeakKeyDictionary()  # model -> [_CacheMemory]
POOL_SIZE = 4  # cache shapes kept per model (e.g. a few batch sizes); more evict the oldest free
_CACHE_TENSORS = ("keys", "values", "cumulative_length")  # what a static layer's decode writes


class _CacheMemory:
    """Tensors for the layers of one static cache, held for the next cache of the same shapes
    once ``owner`` (the cache using them) is gone. ``length``: its longest layer."""

    def __init__(self, key, tensors, owner, length):
        self.key, self.tensors, self.owner, self.length = key, tensors, weakref.ref(owner), length


def _static_layers(cache):
    """The cache's layers if it is transformers' own ``StaticCache`` (not one the caller passed
    in) of initialized full-attention and sliding-window static layers, else None."""
    try:
        from transformers import cache_utils as cu
    except ImportError:
        return None
    kinds = tuple(getattr(cu, n) for n in ("StaticLayer", "StaticSlidingWindowLayer") if hasattr(cu, n))
    layers = getattr(cache, "layers", None)
    if type(cache) is not getattr(cu, "StaticCache", None) or not layers or not kinds \
            or getattr(cache, "_is_user_defined", False):
        return None
    if any(type(layer) not in kinds or not getattr(layer, "is_initialized", False) for layer in layers):
        return None
    return layers


def _settle_cache(model, cache) -> str:
    """After the prefill filled ``cache`` (its layers initialized inside the compiled prefill, at
    fresh addresses): copy its tensors into the model's pooled ones of the same shapes whose last
    cache is gone (or new ones) and point the layers at those, so every decode graph replay sees
    one set of addresses. Dynamo's guards do not change (same shapes, dtypes, devices), so nothing
    recompiles. -> "reused", "new", "unpooled" (the pool is full of live caches) or "skipped"."""
    import torch

    try:
        _settled.add(cache)
    except TypeError:  # not weakly referable / hashable: not transformers' StaticCache anyway
        return "skipped"
    layers = _static_layers(cache)
    if layers is None:
        return "skipped"
    names = [[n for n in _CACHE_TENSORS if isinstance(getattr(layer, n, None), torch.Tensor)]
             for layer in layers]
    key = tuple((type(layer).__name__,) + tuple((n, tuple(getattr(layer, n).shape), getattr(layer, n).dtype,
                                                 str(getattr(layer, n).device)) for n in ns)
                for layer, ns in zip(layers, names))
    pool = _pools.setdefault(model, [])
    mem = next((m for m in pool if m.key == key and m.owner() is None), None)
    how = "reused"
    if mem is None:
        length = max(layer.max_cache_len for layer in layers)
        # generate never shrinks a model's cache length (it sizes each cache to at least the last
        # one's), so free memory of shorter caches would never be used again
        pool[:] = [m for m in pool if m.owner() is not None or m.length >= length]
        if len(pool) >= POOL_SIZE:
            free = [m for m in pool if m.owner() is None]
            if not free:
                return "unpooled"
            pool.remove(free[0])
        mem = _CacheMemory(key, [{n: torch.empty_like(getattr(layer, n)) for n in ns}
                                 for layer, ns in zip(layers, names)], cache, length)
        pool.append(mem)
        how = "new"
    for layer, tensors in zip(layers, mem.tensors):
        for n, t in tensors.items():
            t.copy_(getattr(layer, n))  # stream-ordered after the prefill: no sync
            setattr(layer, n, t)
    mem.owner = weakref.ref(cache)
    return how


def stable_cache_memory(model) -> bool:
    """Keep the static caches ``generate`` builds for ``model`` at one address from one call to the
    next (module docstring): transformers' ``_update_model_kwargs_for_generation`` (called after
    every forward of generate) is wrapped once; for a model of ours, after the prefill, the cache's
    tensors are copied into the model's pooled tensors of the same shapes (those of an earlier
    cache that nothing references any more, else new ones) and the cache points at them. A cache
    the caller still holds (e.g. a returned ``past_key_values``) keeps its tensors to itself; a
    cache the caller passed in is left alone. Up to ``POOL_SIZE`` shapes stay allocated per model
    (``release_cache_memory`` frees them). Off with MXFP4_STABLE_CACHE=0. -> whether installed."""
    if os.environ.get("MXFP4_STABLE_CACHE", "1") in ("0", ""):
        return False
    try:
        from transformers.generation import utils as gen_utils
    except ImportError:
        return False
    mixin = getattr(gen_utils, "GenerationMixin", None)
    theirs = getattr(mixin, "_update_model_kwargs_for_generation", None)
    if theirs is None:
        return False
    if not getattr(theirs, "_mxfp4_scoped", False):
        @functools.wraps(theirs)
        def _update_model_kwargs_for_generation(self, *args, **kwargs):
            model_kwargs = theirs(self, *args, **kwargs)
            if _member(self, _stable) and isinstance(model_kwargs, dict):
                for value in model_kwargs.values():
                    if hasattr(value, "layers") and not _member(value, _settled):
                        log.debug("mxfp4: static cache memory: %s", _settle_cache(self, value))
            return model_kwargs

        _update_model_kwargs_for_generation._mxfp4_scoped = True
        mixin._update_model_kwargs_for_generation = _update_model_kwargs_for_generation
    _enroll(model, _stable, "mxfp4: generate() on this model keeps its static cache at one address "
            "from one call to the next (no CUDA-graph re-recording per call)")
    return True


def fresh_caches(model) -> None:
    """Undo ``stable_cache_memory`` for ``model`` (a new cache at a new address every call) and
    free the memory it kept."""
    _stable.discard(model)
    release_cache_memory(model)


def release_cache_memory(model) -> None:
    """Free the static-cache memory kept for ``model`` (the next ``generate`` allocates anew)."""
    _pools.pop(model, None)
