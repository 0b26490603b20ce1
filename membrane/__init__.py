"""The membrane command line and the local cluster it runs."""

import sys

# nats.py imports aiohttp, when it is installed (the Kubernetes client brings it), for its
# websocket transport only; membrane speaks nats:// alone. That import was 0.12 s of every
# command's 0.45 s start-up. A None module makes it fail the way nats.py expects when aiohttp
# is absent (websocket URLs then say "install aiohttp").
sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]
