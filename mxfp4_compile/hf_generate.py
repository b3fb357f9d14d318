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
"""
from __future__ import annotations

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
            defer_stop_check(model)  # generate's own compile of decode, with our backend
        return None  # not the forward recipe
    if getattr(gc, "disable_compile", False) or cc_ours:
        defer_stop_check(model)  # decode runs this compiled forward, or generate compiles it with mxfp4
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
    defer_stop_check(model)
    msg = ("mxfp4: set generation_config.disable_compile = True on the model whose forward is "
           "compiled with backend='mxfp4': generate() would otherwise trace that forward into its "
           "own torch.compile for decode (default Inductor, bf16 experts)")
    log.info(msg)
    return msg


_deferring = weakref.WeakSet()  # models whose generate() may defer its stop check on CUDA


def _may_defer(device, cache, cache_is_returned, is_assistant, model) -> bool:
    """transformers' own conditions for deferring (a cache that can be rolled back when it is
    returned; never for an assistant model), on CUDA, for a model we compiled."""
    if getattr(device, "type", None) != "cuda" or is_assistant or model not in _deferring:
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
            caller = sys._getframe(1).f_locals.get("self")  # the model whose generate asks
            return _may_defer(device, cache, cache_is_returned, is_assistant, caller)

        is_supported._mxfp4_scoped = True
        cls.is_supported = staticmethod(is_supported)
    if model not in _deferring:
        _deferring.add(model)
        log.info("mxfp4: generate() on this model checks for its end one step late on CUDA "
                 "(transformers' DeferredStopCheck; no host sync per token)")
    return True


def stop_deferring(model) -> None:
    """Undo ``defer_stop_check`` for ``model`` (its generate syncs every token again)."""
    _deferring.discard(model)
