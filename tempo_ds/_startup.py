"""Start-up hook: what happens to ``deepspeed.initialize`` in a process nobody told about tempo_ds.

The ``tempo_ds.pth`` file that installing the package puts beside it in site-packages runs :func:`install` at
every interpreter start of that environment; ``python -m tempo_ds.run`` runs it too. This module uses the
standard library only and does nothing until DeepSpeed is imported (no torch, no DeepSpeed import of its own):
it puts a finder first on ``sys.meta_path`` that wraps DeepSpeed's loader, so right after ``deepspeed``'s own
code has run, before any other module can take ``deepspeed.initialize`` from it, :func:`_on_import` replaces
``deepspeed.initialize`` according to the ``TEMPO_DS`` environment variable:

    TEMPO_DS unset or empty  watch: a config whose ``"tempo"`` section is on, handed to deepspeed.initialize with
                             a model tempo_ds has not injected, gets a loud warning (the section would be
                             ignored); nothing else changes. tempo_ds itself is imported only then.
    TEMPO_DS=1               active: tempo_ds.run.hook (the runner's hook) injects the model as
                             tempo_ds.initialize does, and deepspeed.add_config_arguments also adds the --tempo*
                             options; TEMPO_DS_ARGS holds process-wide tempo options ("--tempo_gelu inplace").
    TEMPO_DS=0               nothing at all.

Any other value is treated as unset and the warning names it.
"""
from __future__ import annotations

import functools
import os
import sys

ENV = "TEMPO_DS"
ARGS_ENV = "TEMPO_DS_ARGS"
TARGET = "deepspeed"
HOOK_ATTRIBUTE = "__tempo_ds_hook__"  # on our wrappers: "watch" or "active"


def mode() -> str:
    """``"off"``, ``"active"`` or ``"watch"``, from the ``TEMPO_DS`` environment variable."""
    value = os.environ.get(ENV, "").strip()
    return {"0": "off", "1": "active"}.get(value, "watch")


def install() -> None:
    """Arrange for :func:`_on_import` to run once DeepSpeed is imported (at once if it already is)."""
    if mode() == "off":
        return
    module = sys.modules.get(TARGET)
    if module is not None:
        _on_import(module)
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _on_import(deepspeed) -> None:
    if mode() == "active":
        from tempo_ds.run import hook

        hook.activate(deepspeed)
    elif mode() == "watch":
        original = deepspeed.initialize
        if getattr(original, HOOK_ATTRIBUTE, None) is None:
            deepspeed.initialize = _watching(original)


def _watching(original):
    """``deepspeed.initialize``, warning first when the call carries a "tempo" section tempo_ds will not see."""

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        try:
            from tempo_ds.run.hook import warn_if_ignored

            warn_if_ignored(original, args, kwargs, os.environ.get(ENV, ""))
        except Exception:  # the check never stands in the way of the user's run (nor does -W error)
            pass
        return original(*args, **kwargs)

    setattr(initialize, HOOK_ATTRIBUTE, "watch")
    return initialize


class _Loader:
    """DeepSpeed's own loader, followed by :func:`_on_import`; it hands the module its real loader back first."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.inner
        try:
            self.inner.exec_module(module)
        finally:
            _remove_finder()
        _on_import(module)


class _Finder:
    """A meta-path finder that only ever answers for ``deepspeed``, by asking the finders after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
