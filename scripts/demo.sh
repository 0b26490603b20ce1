#!/usr/bin/env bash
# The local cluster demo: start membrane, then show identities being allocated from labels
# and shared by every replica of a workload. Leaves the cluster running; `membrane down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
M=".venv/bin/membrane"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ membrane %s\n' "$*"; "$M" "$@"; }

step "Start the local cluster (NATS with JetStream, Redis, the services)"
"$M" up

step "Three replicas of one Deployment: pod-template-hash differs, the identity does not"
for hash in 7d9f8c6b5 5f4d8a9c1 9b8c7d6e2; do
  run identity allocate app=web tier=frontend "io.kubernetes.pod.namespace=default" \
    "pod-template-hash=$hash"
done

step "Another workload gets its own identity"
run identity allocate app=db tier=backend "io.kubernetes.pod.namespace=default"

step "Reserved identities carry Cilium's numbers"
run identity allocate reserved:host

step "Bad labels are refused, naming the label"
run identity allocate "app=-oops" || true

step "Every identity the cluster knows"
run identity list

step "What runs where"
run status

printf '\nThe cluster keeps running. Try `membrane identity allocate app=web`; stop with `membrane down`.\n'
