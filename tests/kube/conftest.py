"""A real etcd per module, and per test a Kubernetes API test double on it
(``tests/support/kube_api_double.py``) with a client of the official library."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from l7proxy.kube.source import api_client
from tests.support import etcd as etcd_support
from tests.support.kube_api_double import KubeApiDouble, running_kube_api

_prefixes = itertools.count()


@pytest.fixture
async def kube_api(etcd: etcd_support.EtcdServer) -> AsyncIterator[KubeApiDouble]:
    async with running_kube_api(etcd, f"kube{next(_prefixes)}", bookmark_every=0.2) as api:
        yield api


@pytest.fixture
async def kubeclient(kube_api: KubeApiDouble, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    """The official client, configured from a kubeconfig, as ``--kubeconfig`` does."""
    api = await api_client(kube_api.write_kubeconfig(tmp_path / "kubeconfig"))
    async with api:
        yield api
