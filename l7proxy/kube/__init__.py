"""Kubernetes as the source of this node's endpoints and of policies (docs/cluster.md):
the official asyncio client (``kubernetes_asyncio``) lists and watches Pods on this
node, Namespaces, CiliumNetworkPolicies and CiliumClusterwideNetworkPolicies."""
