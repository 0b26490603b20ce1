"""The policy service: CiliumNetworkPolicy and NetworkPolicy documents, resolved per identity."""
