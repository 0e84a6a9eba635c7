"""The running agent's status file: written by the agent, read by ``l7proxy status`` and
``policy trace``."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from l7proxy.node.store import Store


def read_status(store: Store, max_age: float = 5.0) -> dict[str, Any] | None:
    """The status the agent last wrote, or None if no agent runs or it is stale."""
    try:
        pid = int(store.pid_file.read_text())
        os.kill(pid, 0)
        if time.time() - store.status_file.stat().st_mtime > max_age:
            return None
        return json.loads(store.status_file.read_text())
    except (FileNotFoundError, ValueError, ProcessLookupError, json.JSONDecodeError):
        return None
