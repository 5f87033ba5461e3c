"""Pytest plugin for `make compat`: lets upstream PEFT's test modules import against this package.

Upstream's test files import names this fork does not ship (other tuner types, helpers). Each missing name becomes
a placeholder that raises `MissingInFork` when used, so a test module still collects and only the tests that use a
missing feature fail (with that error, which the report groups). Nothing a test asserts is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class MissingInFork(NotImplementedError):
    """A name upstream PEFT 0.21.2 has and this package does not."""


def _placeholder(module: str, name: str):
    """A class for a capitalised name (instances can be built, e.g. in a module-level test table, but any attribute
    use raises), a string for an ALL-CAPS constant, else a function that raises when called."""
    where = f"{module}.{name}"

    def fail(*args, **kwargs):
        raise MissingInFork(f"{where} is not in this package")

    if name.isupper():
        return _MissingConstant(where)
    if name[:1].isupper():
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            raise MissingInFork(f"{where} is not in this package")

        return type(name, (), {
            "__init__": lambda self, *a, **k: None, "__getattr__": __getattr__, "__module__": module,
            "__repr__": lambda self: f"<missing {where}>", "from_pretrained": classmethod(fail),
            "compat_missing": where,
        })
    fail.__name__ = name
    fail.compat_missing = where
    return fail


class _MissingConstant(str):
    pass


def _fallback_getattr(module_name: str, original=None):
    def __getattr__(name: str):
        if original is not None:
            try:
                return original(name)
            except AttributeError:
                pass
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(module_name, name)
        return value

    __getattr__.compat_fallback = True
    return __getattr__


def _patch(module: types.ModuleType) -> None:
    current = module.__dict__.get("__getattr__")
    if getattr(current, "compat_fallback", False):
        return
    module.__getattr__ = _fallback_getattr(module.__name__, current)


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__path__ = []
        _patch(module)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "peft" and not fullname.startswith("peft."):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name, module in list(sys.modules.items()):
        if (name == "peft" or name.startswith("peft.")) and module is not None:
            _patch(module)


install()
