"""The Star Wars demo from Cilium's getting-started guide, run for real on this node."""
