"""No server path reaches a client: what workers record for people to read is rewritten before it is stored.

The engine speaks in local paths (a checkpoint event carries its folder, an exception names the file it failed on,
a traceback names every source file). Those paths say where the platform keeps its files and how it is installed;
clients need neither. ``hide_server_paths`` rewrites every string in a JSON-able value:

- a path inside ``relative_to`` (a job's folder) becomes relative to it: ``run/checkpoints/step-000010``;
- any other path below a root of the server becomes the root's name: ``<jobs>/…``, ``<storage>/…``, ``<tmp>/…``,
  ``<python>/…`` (the interpreter and its packages), ``<app>/…`` (the installed code), longest root first.

Applied where worker output is stored for the web (the job sink's events, a failed job's error), so every API
response, page and websocket message built from the database is clean whatever serialises it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from django.conf import settings


def _roots() -> list[tuple[str, str]]:
    roots = {
        str(settings.JOBS_WORK_DIR): "<jobs>",
        str(settings.MEDIA_ROOT): "<storage>",
        tempfile.gettempdir(): "<tmp>",
        sys.prefix: "<python>",
        sys.base_prefix: "<python>",
        str(settings.BASE_DIR): "<app>",
    }
    # The same folders as the kernel resolves them (a symlinked /tmp, a relative setting).
    for path, name in list(roots.items()):
        roots.setdefault(os.path.realpath(path), name)
    # Longest first, so that a root inside another (var/jobs inside the app's folder) keeps its own name.
    return sorted(((p.rstrip("/"), n) for p, n in roots.items() if len(p.rstrip("/")) > 1), key=lambda r: -len(r[0]))


def _hide(text: str, local: list[str], roots: list[tuple[str, str]]) -> str:
    if "/" not in text:
        return text
    for prefix in local:
        text = "." if text == prefix else text.replace(prefix + "/", "")
    for prefix, name in roots:
        text = text.replace(prefix, name)
    return text


def hide_server_paths(value: Any, relative_to: str | os.PathLike[str] | None = None) -> Any:
    """``value`` (strings, lists and dicts of them, anything else as is) with server paths rewritten (see the
    module docstring)."""
    local: list[str] = []
    if relative_to is not None:
        for path in (str(Path(relative_to)), os.path.realpath(relative_to)):
            if path not in local:
                local.append(path.rstrip("/"))
    roots = _roots()

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return _hide(item, local, roots)
        if isinstance(item, Mapping):
            return {key: walk(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [walk(inner) for inner in item]
        return item

    return walk(value)


def describe_failure(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"`` for people to read, without server paths."""
    text: str = hide_server_paths(f"{type(exc).__name__}: {exc}")
    return text
