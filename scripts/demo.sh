#!/usr/bin/env bash
# The local cluster demo: two nodes, pods as network namespaces, identity-aware policy in eBPF.
# Leaves the cluster running; `membrane down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
M=".venv/bin/membrane"
PY=".venv/bin/python"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ membrane %s\n' "$*"; "$M" "$@"; }

step "Start the local cluster: NATS, Redis, the identity service, 2 nodes with their agents"
"$M" up --nodes 2

step "Three pods on two nodes; each gets an IP from its node's pod CIDR and an identity"
run pod create deathstar --labels org=empire,class=deathstar --node membrane-node-1
run pod create xwing --labels org=alliance,class=xwing --node membrane-node-2
run pod create tiefighter --labels org=empire,class=tiefighter --node membrane-node-2
run pod list

ip_of() { "$M" pod list -o json | $PY -c "import json,sys; print([p['ip'] for p in json.load(sys.stdin)['items'] if p['name']=='$1'][0])"; }
DS_IP=$(ip_of deathstar)
# the policies of an earlier run of this demo are still stored (state outlives `down`): the
# L7 stage's rule1 would drop the xwing's first connection below
"$M" policy delete empire-only >/dev/null 2>&1 || true
"$M" policy delete rule1 >/dev/null 2>&1 || true
sleep 0.5

step "A server in the deathstar pod (node 1); both ships (node 2) reach it over the VXLAN overlay"
"$M" pod exec deathstar -- $PY tests/e2e/netprobe.py serve tcp 80 >/dev/null &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
sleep 1
run pod exec xwing -- $PY tests/e2e/netprobe.py tcp "$DS_IP" 80
run pod exec tiefighter -- $PY tests/e2e/netprobe.py tcp "$DS_IP" 80
run pod exec xwing -- ping -c 1 -W 1 "$DS_IP"

step "A CiliumNetworkPolicy: only empire ships may reach the deathstar on 80/TCP"
cat examples/empire-only.yaml
run apply -f examples/empire-only.yaml
sleep 0.5
run pod exec tiefighter -- $PY tests/e2e/netprobe.py tcp "$DS_IP" 80
run pod exec xwing -- $PY tests/e2e/netprobe.py tcp "$DS_IP" 80 || echo "(xwing was dropped, as the policy says)"

step "Why: the same resolved policy the datapath enforces"
run policy explain --from tiefighter --to deathstar --port 80/TCP
run policy explain --from xwing --to deathstar --port 80/TCP || true
run policy list

step "The drop, counted in the datapath by reason and direction"
run bpf metrics --node membrane-node-1
step "The policy entries installed for the deathstar, and the connections tracked"
run bpf policy deathstar
run bpf ct --node membrane-node-1

step "A Deployment of 3 replicas behind a Service: one cluster IP, BPF hash maps on every node"
run apply -f examples/web-service.yaml
WEB_PODS=$("$M" pod list -o json | $PY -c "import json,sys; print(' '.join(p['name'] for p in json.load(sys.stdin)['items'] if p['labels'].get('app')=='web'))")
WEB_SERVERS=""
for pod in $WEB_PODS; do
  "$M" pod exec "$pod" -- $PY tests/e2e/netprobe.py whoami tcp 8080 >/dev/null &
  WEB_SERVERS="$WEB_SERVERS $!"
done
trap 'kill $SERVER $WEB_SERVERS 2>/dev/null || true' EXIT
sleep 1
run service list
VIP=$("$M" service get web -o json | $PY -c "import json,sys; print(json.load(sys.stdin)['frontends'][0]['ip'])")
echo "tiefighter asks $VIP:80 twelve times; each answer is the replica that served it:"
"$M" pod exec tiefighter -- $PY tests/e2e/netprobe.py ask tcp "$VIP" 80 12 | $PY -c "import collections,json,sys; print(dict(collections.Counter(json.load(sys.stdin))))"
run bpf lb --node membrane-node-1

step "L7: Cilium's Star Wars policy, unchanged. Only POST /v1/request-landing from empire ships"
# the node's transparent proxy checks every HTTP request; it serves the pods of its own node,
# so the L7 stage uses a second tiefighter next to the deathstar
kill $SERVER 2>/dev/null || true
"$M" policy delete empire-only >/dev/null
"$M" policy delete rule1 >/dev/null 2>&1 || true
run pod create tiefighter-l7 --labels org=empire,class=tiefighter --node membrane-node-1
"$M" pod exec deathstar -- $PY tests/e2e/starwars.py serve 80 >/dev/null &
SERVER=$!
sleep 1
cat examples/starwars/sw_l3_l4_l7_policy.yaml
run apply -f examples/starwars/sw_l3_l4_l7_policy.yaml
sleep 0.5
echo "tiefighter: POST /v1/request-landing, then PUT /v1/exhaust-port, on one connection:"
run pod exec tiefighter-l7 -- $PY tests/e2e/starwars.py request 2 "$DS_IP" 80 POST /v1/request-landing PUT /v1/exhaust-port
sleep 0.5
run observe --type l7 --last 2

step "What runs where, the nodes, and their latency matrix (health probes every 5 s)"
run status

step "The demo's flows as the monitor saw them: both pods, identities, reason and deciding policy"
sleep 0.5
run observe --to-pod deathstar --last 20
printf '$ membrane observe --verdict DROPPED --from-pod xwing --last 1 -o json\n'
"$M" observe --verdict DROPPED --from-pod xwing --last 1 -o json | $PY -m json.tool

printf '\nThe cluster keeps running. Try `membrane pod exec xwing -- ping -c1 %s`; stop with `membrane down`.\n' "$DS_IP"
