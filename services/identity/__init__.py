"""The identity service: label set -> numeric security identity, and cluster-pool IPAM."""
