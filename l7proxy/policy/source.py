"""Policy files on disk: load, validate, and reload without ever losing the last good set.

A reload that fails leaves the policy in force untouched and reports the
file, the YAML path and the reason. Both the agent and firewall mode read
their policies through a ``PolicySource``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from l7proxy.policy.errors import PolicyError
from l7proxy.policy.load import load_paths
from l7proxy.policy.model import Policy

log = logging.getLogger("l7proxy.policy")

# Per file: (path, modification time in ns, size), or (path, None, None) if it is gone.
Stamp = tuple[tuple[str, int | None, int | None], ...]


class PolicySource:
    """Watches policy paths (files or directories) by modification stamp.

    ``on_change`` receives every policy set that was loaded whole; ``last_error``
    is the reason the latest attempt was rejected, or None once one succeeds.
    ``verify``, if given, checks a set beyond its YAML before it takes effect (the
    proxy reads the TLS files a policy names): its ``PolicyError`` rejects the set.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        on_change: Callable[[list[Policy]], None],
        verify: Callable[[list[Policy]], None] | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        self.on_change = on_change
        self.verify = verify
        self._stamp: Stamp = ()
        self.last_error: PolicyError | None = None
        self.imports = 0
        self.import_errors = 0

    def _current_stamp(self) -> Stamp:
        items: list[tuple[str, int | None, int | None]] = []
        for path in self.paths:
            files = sorted(path.iterdir()) if path.is_dir() else [path]
            for f in files:
                try:
                    st = os.stat(f)
                except FileNotFoundError:
                    items.append((str(f), None, None))
                    continue
                items.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(items)

    def load(self) -> list[Policy]:
        """Initial load: raises PolicyError (nothing is in force yet)."""
        self._stamp = self._current_stamp()
        policies = load_paths(self.paths)
        if self.verify is not None:
            self.verify(policies)
        self.imports += 1
        self.on_change(policies)
        return policies

    def poll(self) -> bool:
        """Reload if anything changed. Returns True if a new policy took effect."""
        if self._current_stamp() == self._stamp:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Load now. A rejected set is logged and counted, and the last good one
        stays in force. Returns True if a new policy took effect."""
        self._stamp = self._current_stamp()
        try:
            policies = load_paths(self.paths)
            if self.verify is not None:
                self.verify(policies)
        except PolicyError as err:
            self.last_error = err
            self.import_errors += 1
            log.error("policy rejected, keeping the last good policy: %s", err)
            return False
        self.last_error = None
        self.imports += 1
        self.on_change(policies)
        log.info("policy loaded: %d policies", len(policies))
        return True
