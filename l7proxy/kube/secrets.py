"""Kubernetes Secrets as the files the proxy's TLS reads.

The agent watches the Secrets of one namespace (``run --k8s --tls-secrets-namespace``,
``l7proxy-secrets`` by default; its RBAC grants that namespace only, as Cilium reads
policy secrets from ``cilium-secrets``) and writes each one where a mounted Secret volume
would put it: ``DIR/<namespace>/<name>/<key>``, one file per data key, mode 0600 in
0700 directories. The proxy's ``TlsStore`` (``l7proxy/proxy/tls.py``) reads them like any
secrets directory, and its poll of their modification times is what turns a renewed
Secret into new connections' certificate. A file is replaced whole (written beside it,
then renamed), so a poll never reads half of one. A Secret deleted loses its directory.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("l7proxy.kube.secrets")

# A Secret's data key: what the API server accepts (and nothing that walks a path).
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


class SecretFiles:
    """The Secrets of a watched namespace, as files under ``directory``."""

    def __init__(self, directory: Path, namespace: str) -> None:
        self.directory = directory
        self.namespace = namespace
        self.written: dict[str, dict[str, bytes]] = {}  # name -> key -> content
        self.writes = 0

    def replace(self, objects: Iterable[Mapping[str, Any]]) -> bool:
        """A fresh list: write every Secret, remove those no longer listed."""
        listed = {}
        for obj in objects:
            name, data = self._decode(obj)
            if name is not None:
                listed[name] = data
        changed = False
        for name in [n for n in self.written if n not in listed]:
            changed |= self._remove(name)
        for name, data in listed.items():
            changed |= self._write(name, data)
        return changed

    def apply(self, event: str, obj: Mapping[str, Any]) -> bool:
        """One watch event; True if a file changed."""
        name, data = self._decode(obj)
        if name is None:
            return False
        if event == "DELETED":
            return self._remove(name)
        return self._write(name, data)

    def _decode(self, obj: Mapping[str, Any]) -> tuple[str | None, dict[str, bytes]]:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        if meta.get("namespace") != self.namespace or not _KEY.match(name):
            return None, {}
        data: dict[str, bytes] = {}
        for key, value in (obj.get("data") or {}).items():
            if not _KEY.match(str(key)) or key in (".", ".."):
                log.warning("secret %s/%s: key %r skipped", self.namespace, name, key)
                continue
            try:
                data[str(key)] = base64.b64decode(str(value or ""), validate=True)
            except (binascii.Error, ValueError):
                log.warning(
                    "secret %s/%s: key %r is not base64, skipped", self.namespace, name, key
                )
        return name, data

    def _write(self, name: str, data: dict[str, bytes]) -> bool:
        if self.written.get(name) == data:
            return False
        target = self.directory / self.namespace / name
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        for key, content in data.items():
            if self.written.get(name, {}).get(key) == content:
                continue
            tmp = target / f".{key}.new"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(tmp, target / key)
        for key in set(self.written.get(name, {})) - set(data):
            with contextlib.suppress(FileNotFoundError):
                (target / key).unlink()
        self.written[name] = data
        self.writes += 1
        return True

    def _remove(self, name: str) -> bool:
        if self.written.pop(name, None) is None:
            return False
        shutil.rmtree(self.directory / self.namespace / name, ignore_errors=True)
        return True
