"""Optional third-party packages a kernel module builds on (triton_kernels, FlashInfer).

An ``OptionalAPI`` describes the part of a package's API a kernel module uses: the modules and
names it reads, the keyword arguments it passes to a function, the packages that must be installed
first, and what to install. ``load()`` imports it once and checks that description against what is
installed, returning (namespace of the names, None) or (None, the reason it cannot be used): a
reason says what is missing and what to install, never just an ImportError.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import types
from collections.abc import Callable, Mapping, Sequence


class KernelUnavailable(RuntimeError):
    """A kernel's optional package is missing, or its API is not the one the kernel supports."""


def keyword_mismatch(fn: Callable, passed: Sequence[str], fn_name: str, supported: str) -> str | None:
    """None when ``fn`` takes every keyword in ``passed`` and requires no other, else what differs.
    A signature that cannot be read, or that takes ``**kwargs``, passes (the call itself will tell)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    missing = [n for n in passed if n not in params]
    if missing:
        return (f"{fn_name} has no parameter(s) {missing}; this kernel module was written "
                f"against {supported}")
    required_unknown = [n for n, p in params.items()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                        and n not in passed]
    if required_unknown:
        return (f"{fn_name} requires {required_unknown}, which this kernel module does not pass "
                f"(an API other than {supported})")
    return None


class OptionalAPI:
    """An optional package and the API of it that one kernel module uses.

    package   import name ("flashinfer")
    kernel    the kernel name users pass (for the error ``require`` raises)
    install   what to do to get a supported version (ends every "not installed" reason)
    supported one line naming the supported API / versions
    modules   {module: names}: "" is the package itself, else a submodule path relative to it;
              each name becomes an attribute of the namespace ``load`` returns
    requires  {package: how to install it}: packages that must be installed before this one
    markers   {submodule: what its absence means}: submodules probed before anything is imported
              from the package's submodules (an API change shows as a missing module)
    keywords  {name: keywords passed}: functions among ``modules``' names whose signature must
              take those keywords (``keyword_mismatch``)
    optional  {attribute: (module, name)}: read when present, None otherwise
    error     the exception ``require`` raises (a KernelUnavailable subclass)
    The namespace also has ``where`` (the package's location, or None), ``version`` (its
    ``__version__``, or None) and ``label`` (the package, version and location, for messages).
    """

    def __init__(self, package: str, *, kernel: str, install: str, supported: str,
                 modules: Mapping[str, Sequence[str]], requires: Mapping[str, str] | None = None,
                 markers: Mapping[str, str] | None = None,
                 keywords: Mapping[str, Sequence[str]] | None = None,
                 optional: Mapping[str, tuple[str, str]] | None = None,
                 error: type[KernelUnavailable] = KernelUnavailable):
        self.package, self.kernel, self.install, self.supported = package, kernel, install, supported
        self.modules = dict(modules)
        self.requires = dict(requires or {})
        self.markers = dict(markers or {})
        self.keywords = dict(keywords or {})
        self.optional = dict(optional or {})
        self.error = error
        self._result: tuple[types.SimpleNamespace | None, str | None] | None = None

    def _full(self, module: str) -> str:
        return f"{self.package}.{module}" if module else self.package

    def load(self) -> tuple[types.SimpleNamespace | None, str | None]:
        """-> (namespace, None) when a supported version is importable, else (None, reason).
        Cached: ``cache_clear()`` makes the next call look again."""
        if self._result is None:
            self._result = self._load()
        return self._result

    def cache_clear(self) -> None:
        self._result = None

    def reason(self) -> str | None:
        """None when a supported version is importable, else why not."""
        return self.load()[1]

    def require(self) -> types.SimpleNamespace:
        """The namespace, or ``error`` saying why the kernel cannot run."""
        ns, reason = self.load()
        if ns is None:
            raise self.error(f"MXFP4 kernel {self.kernel!r} cannot run: {reason}")
        return ns

    def _load(self):
        pkg = self.package
        try:
            for dep, how in self.requires.items():
                if importlib.util.find_spec(dep) is None:
                    return None, f"{dep} is not installed ({how}); {pkg} needs it"
            if importlib.util.find_spec(pkg) is None:
                return None, f"{pkg} is not installed (not importable from this Python); {self.install}"
            top = importlib.import_module(pkg)
        except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
            return None, f"importing {pkg} failed ({type(e).__name__}: {e}); {self.install}"
        where = (list(getattr(top, "__path__", None) or []) or [getattr(top, "__file__", None)])[0]
        version = getattr(top, "__version__", None)
        label = pkg + (f" {version}" if version else "") + (f" at {where}" if where else "")
        ns = types.SimpleNamespace(where=where, version=version, label=label)
        for sub, meaning in self.markers.items():
            try:
                found = importlib.util.find_spec(self._full(sub)) is not None
            except Exception:  # noqa: BLE001 - a broken parent package: the import below says
                found = True
            if not found:
                return None, (f"{label} has no `{sub}` module{meaning}, an API this kernel module "
                              f"does not support; it supports {self.supported}. {self.install}")
        for sub, names in self.modules.items():
            try:
                mod = importlib.import_module(self._full(sub))
            except Exception as e:  # noqa: BLE001
                return None, (f"{label}: importing {self._full(sub)} failed ({type(e).__name__}: {e}); "
                              f"this kernel module supports {self.supported}")
            for n in names:
                if not hasattr(mod, n):
                    return None, (f"{label}: {self._full(sub)} has no {n!r}; this kernel module "
                                  f"supports {self.supported}")
                setattr(ns, n, getattr(mod, n))
        for n, passed in self.keywords.items():
            err = keyword_mismatch(getattr(ns, n), passed, n, self.supported)
            if err:
                return None, f"{label}: {err}"
        for attr, (sub, n) in self.optional.items():
            try:
                setattr(ns, attr, getattr(importlib.import_module(self._full(sub)), n))
            except (ImportError, AttributeError):
                setattr(ns, attr, None)
        return ns, None
