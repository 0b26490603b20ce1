"""The per-node L7 proxy: HTTP rules of the resolved policy enforced per request."""
