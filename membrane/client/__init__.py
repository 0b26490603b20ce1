"""Talking to a cluster: bus requests and file loading, for every client of the bus.

The CLI commands (``membrane/cli_*.py``), ``bench/``, the tests and the Kubernetes bridge
all go through these modules, so one apply path serves them all. Nothing here parses command
lines or prints: a command module turns arguments into calls and replies into text.

Layers (each imports only the ones below it)::

    membrane.cli, membrane.cli_*        argparse, rendering
    membrane.client.workloads           pods, Deployments, namespaces, manifests applied
    membrane.client.recorded            recorded flows counted by the monitor, pods' ports
    membrane.client.{lb,policy,flows,cluster,identity}   one service's requests each
    membrane.client.files               reading YAML from files and stdin
"""
