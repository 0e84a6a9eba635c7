"""Policy: the CiliumNetworkPolicy model, its loader, and the engine that decides."""
