"""User functions named in the config as "pkg.module:function" (custom rewards, the python step judge).

    fn = load_function("myrewards:brevity", key="reward.custom[0].function")

The module is imported with importlib, so it must be importable by the process that trains or
evaluates (installed, on PYTHONPATH, or in the working directory `python -m` starts from). Every
problem (bad spelling, module not found, import error inside the module, missing attribute, not
callable) raises PluginError with one line naming the config key, the value and the cause; the
entry points turn it into exit code 2.

Calls pass keyword arguments only. A function that takes **kwargs receives every argument; one that
does not receives only the arguments it names (so `def brevity(completions): ...` works), and a
required parameter that no argument fills is refused at start-up.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import concurrent.futures

_SPEC = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


class PluginError(ValueError):
    """A user function cannot be loaded or has an unusable signature; the message is one line."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_function(spec: Any, key: str) -> Callable:
    """The callable `spec` = "pkg.module:function" (a dotted attribute path after the colon also works,
    e.g. "pkg.module:Class.method"); PluginError naming `key` when it cannot be loaded."""
    if not isinstance(spec, str) or not _SPEC.match(spec.strip()):
        raise PluginError(f"{key}={spec!r} must look like 'pkg.module:function'")
    module_name, _, attr_path = spec.strip().partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        where = "" if e.name == module_name else f" (while importing it: {_one_line(e)})"
        raise PluginError(f"{key}={spec!r}: cannot import module '{module_name}'{where}; is it on PYTHONPATH "
                          f"or in the working directory?") from None
    except Exception as e:   # the user's module raised while being imported
        raise PluginError(f"{key}={spec!r}: importing module '{module_name}' failed: {_one_line(e)}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{key}={spec!r}: module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{key}={spec!r}: '{attr_path}' is a {type(obj).__name__}, not a function")
    return obj


def is_async(fn: Callable) -> bool:
    """Whether calling fn returns a coroutine (async def, or an object whose __call__ is async def)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class KeywordCall:
    """Calls fn with the keyword arguments it accepts (all of them when it takes **kwargs).

    offered: every argument name a call will pass, or None when they are only known at call time (record
    columns); a positional-only required parameter, or a required one outside `offered`, is refused here
    (PluginError naming `key`), not at the first call."""

    def __init__(self, fn: Callable, offered: Iterable[str] | None, key: str, spec: str):
        self.fn = fn
        offered = None if offered is None else list(offered)
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):   # builtins without a signature: pass everything
            self.accepted = None
            return
        if any(p.kind is p.VAR_KEYWORD for p in params):
            self.accepted = None
        else:
            self.accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for p in params:
            required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            if required and p.kind is p.POSITIONAL_ONLY:
                raise PluginError(f"{key}={spec!r}: parameter '{p.name}' is positional-only; arguments are "
                                  f"passed by keyword")
            if required and offered is not None and p.name not in offered:
                raise PluginError(f"{key}={spec!r}: required parameter '{p.name}' is not one of the arguments "
                                  f"passed by keyword ({', '.join(offered)})")

    def __call__(self, **kwargs):
        if self.accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepted}
        return self.fn(**kwargs)


class EventLoopThread:
    """One asyncio event loop in a daemon thread, started on first use and kept for the whole run, so
    async user functions can keep clients (HTTP sessions) bound to it across steps."""

    def __init__(self, name: str):
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def submit(self, awaitable) -> "concurrent.futures.Future":
        """Schedule a coroutine (or any awaitable) on the loop; returns a concurrent.futures.Future."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True).start()

        async def wait():
            return await awaitable
        return asyncio.run_coroutine_threadsafe(wait(), self._loop)

    def run(self, awaitable):
        """Await it on the loop and return its result (re-raises its exception)."""
        return self.submit(awaitable).result()


__all__ = ["EventLoopThread", "KeywordCall", "PluginError", "is_async", "load_function"]
