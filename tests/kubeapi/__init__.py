"""A fake Kubernetes API server for tests: list/watch as the real one serves them."""

from shared.runtime import unblock_aiohttp

unblock_aiohttp()  # the server and the official client run on it
