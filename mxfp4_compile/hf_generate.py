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
"""
from __future__ import annotations

import logging
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
    fwd = getattr(model, "__dict__", {}).get("forward")
    if fwd is None or not hasattr(fwd, "_torchdynamo_orig_callable"):
        return None  # not the forward recipe (e.g. generate's own compile with our backend)
    if getattr(gc, "disable_compile", False):
        return None
    cc = getattr(gc, "compile_config", None)
    if cc is not None and _is_ours(getattr(cc, "backend", None)):
        return None  # generate compiles decode with mxfp4 as the user configured it
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
    msg = ("mxfp4: set generation_config.disable_compile = True on the model whose forward is "
           "compiled with backend='mxfp4': generate() would otherwise trace that forward into its "
           "own torch.compile for decode (default Inductor, bf16 experts)")
    log.info(msg)
    return msg
