"""Where ``moe-builder login`` keeps the server address and the API token.

``$MOE_BUILDER_CONFIG``, else ``$XDG_CONFIG_HOME/moe-builder/credentials.json`` (``~/.config/...``): a JSON object
``{"url", "token", "username"}``, written with mode 0600 (the token is a password).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def path() -> Path:
    explicit = os.environ.get("MOE_BUILDER_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "moe-builder" / "credentials.json"


def load() -> dict[str, Any]:
    """The saved credentials, ``{}`` when there are none (or the file is unreadable)."""
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(url: str, token: str, username: str) -> Path:
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 before anything is written: the token is never readable by others, even for a moment.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"url": url, "token": token, "username": username}, out)
    os.chmod(target, 0o600)
    return target
