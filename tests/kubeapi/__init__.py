"""A fake Kubernetes API server for tests: list/watch as the real one serves them."""
