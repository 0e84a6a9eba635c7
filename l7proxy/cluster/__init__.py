"""Cluster mode, part 1: identities, ipcache and nodes shared through etcd.

``store.ClusterStore`` is what the agent calls; the rest are its parts:
``keys`` (Cilium's kvstore layout and encodings), ``kv`` (the etcd client),
``allocator`` (transactions that hand out numbers), ``gc`` (collection of
unreferenced identities), ``session`` (the node's lease and its keys),
``mirror`` (list, watch, list again) and ``protect`` (back-off and a request
budget). See docs/cluster.md.
"""
