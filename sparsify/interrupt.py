"""Ctrl-C that a long command cannot lose.

CPython turns SIGINT into a KeyboardInterrupt raised in whatever Python code the main thread
runs next. When that code is a finalizer (``__del__``, a weakref callback) or a ctypes callback
(llvmlite calls one while numba compiles), the exception cannot propagate: CPython reports it as
unraisable and drops it, and the command runs on to the end as if nothing had been pressed.

:func:`install` makes the interrupt sticky: the handler records the signal before it raises, and
:func:`check`, called at every progress step of the long commands, raises it again. A dropped
KeyboardInterrupt is then not reported either (it is about to be raised where it can
propagate), so the command still ends on its one ``error: interrupted`` line.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

_pending = False
_default_unraisable = sys.unraisablehook


def _on_sigint(signum: int, frame: Any) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def _unraisable(info: Any) -> None:
    if _pending and isinstance(info.exc_value, KeyboardInterrupt):
        return
    _default_unraisable(info)


def install() -> None:
    """Take over SIGINT for the process. A no-op where SIGINT is not Python's default handler
    (ignored, as in a shell's background job, or already replaced by an embedding program)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT has arrived, whether or not it was raised before."""
    if _pending:
        raise KeyboardInterrupt


def checked(update: Callable[[int], Any]) -> Callable[[int], None]:
    """``update`` (a progress callback) preceded by :func:`check`."""

    def tick(n: int) -> None:
        check()
        update(n)

    return tick
