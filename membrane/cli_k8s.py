"""``membrane k8s``: what an installation on Kubernetes (k8s/) needs besides the manifests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from membrane import k8s_secrets


def cmd_secrets(args: argparse.Namespace) -> int:
    documents = k8s_secrets.generate(
        Path(args.ca_dir), domain=args.cluster_domain, nats_replicas=args.nats_replicas
    )
    sys.stdout.write(k8s_secrets.render(documents))
    print(
        f"# membrane k8s secrets: the CA's key stays in {args.ca_dir} (keep it; run again with "
        "it to renew the certificates); apply the Secrets with `kubectl apply -f -`",
        file=sys.stderr,
    )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("k8s", help="membrane on Kubernetes: docs/kubernetes.md")
    k8s_sub = p.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    sp = k8s_sub.add_parser(
        "secrets",
        help="the Secrets k8s/ uses (a NATS password per role, Redis's, TLS certificates and "
        "their CA), as YAML on stdout, for `kubectl apply -f -` (docs/kubernetes.md)",
    )
    sp.add_argument(
        "--ca-dir",
        default="membrane-k8s-ca",
        help="where the CA is made (once) and kept; its key never goes into the cluster "
        "(default: ./membrane-k8s-ca)",
    )
    sp.add_argument(
        "--cluster-domain", default="cluster.local", help="the cluster's DNS domain (cluster.local)"
    )
    sp.add_argument(
        "--nats-replicas",
        type=int,
        default=k8s_secrets.NATS_REPLICAS,
        help="servers of the nats StatefulSet, each named in its certificate (3)",
    )
    sp.set_defaults(func=cmd_secrets)
