"""Policy files on disk: load, validate, and reload without ever losing the last good set.

A reload that fails leaves the policy in force untouched and reports the
file, the YAML path and the reason. Both the agent and firewall mode read
their policies through a ``PolicySource``.
"""

from __future__ import annotations

import logging
import os
import shutil
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
        return stamp(self.paths)

    def load(self) -> list[Policy]:
        """Initial load: raises PolicyError (nothing is in force yet)."""
        self._stamp = self._current_stamp()
        policies = load_paths(self.paths)
        if self.verify is not None:
            self.verify(policies)
        self.imports += 1
        self.on_change(policies)
        return policies

    def load_or_fall_back(self, fallback: Sequence[Path]) -> list[Policy]:
        """Initial load of a process started while others run on the same files
        (a restarted worker): if the files are bad now, the last good copy at
        ``fallback`` (a ``PolicySnapshot``) is put in force, and the files'
        error is reported and kept as ``last_error``, as a reload would."""
        try:
            return self.load()
        except PolicyError as err:
            policies = load_paths(fallback)  # a snapshot was validated when taken
            if self.verify is not None:
                try:  # its TLS files: a port whose context does not load is not terminated
                    self.verify(policies)
                except PolicyError as tls_err:
                    log.error("the last good policy's TLS files do not load: %s", tls_err)
            self.last_error = err
            self.import_errors += 1
            self.imports += 1
            self.on_change(policies)
            log.error("policy rejected, starting with the last good policy: %s", err)
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


def stamp(paths: Sequence[Path]) -> Stamp:
    """What the policy files look like now: each file with its mtime and size."""
    items: list[tuple[str, int | None, int | None]] = []
    for path in paths:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for f in files:
            try:
                st = os.stat(f)
            except FileNotFoundError:
                items.append((str(f), None, None))
                continue
            items.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(items)


class PolicySnapshot:
    """A copy of the last good policy files, for a process that starts while the
    files on disk are bad (``firewall --workers``: a restarted worker).

    ``refresh`` copies the files when they changed and keeps the copy only if it
    loads; ``paths`` mirror the watched paths (a directory as a directory, a
    file as a file) inside ``directory``, or are None before any good copy.
    """

    KEPT = 2  # copies kept: a process may still be reading the one before

    def __init__(self, paths: Sequence[str | Path], directory: Path) -> None:
        self.sources = [Path(p) for p in paths]
        self.directory = directory
        self.paths: list[Path] | None = None
        self._stamp: Stamp = ()
        self._generation = 0

    def refresh(self) -> bool:
        """Take a new copy if the files changed and load whole. True if one was taken."""
        now = stamp(self.sources)
        if now == self._stamp:
            return False
        self._stamp = now
        self._generation += 1
        root = self.directory / f"gen-{self._generation}"
        copies: list[Path] = []
        for i, source in enumerate(self.sources):
            target = root / str(i)
            target.mkdir(parents=True)
            try:
                if source.is_dir():
                    for f in sorted(source.iterdir()):
                        if f.is_file():
                            shutil.copyfile(f, target / f.name)
                    copies.append(target)
                else:
                    shutil.copyfile(source, target / source.name)
                    copies.append(target / source.name)
            except OSError:  # changed under us: the next refresh sees a new stamp
                self._stamp = ()
                shutil.rmtree(root, ignore_errors=True)
                return False
        try:
            load_paths(copies)
        except PolicyError:
            shutil.rmtree(root, ignore_errors=True)
            return False
        self.paths = copies
        stale = self._generation - self.KEPT
        if stale > 0:
            shutil.rmtree(self.directory / f"gen-{stale}", ignore_errors=True)
        return True
