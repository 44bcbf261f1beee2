#!/usr/bin/env bash
# Two "hosts" on this machine: two network namespaces joined by a veth pair, each running its own torchrun
# as one node of a 2-node job, meeting at a c10d rendezvous on the first host's address. What crosses the
# veth is exactly what crosses a real network between two nodes (rendezvous store, gloo/NCCL traffic).
#
#   sudo bash scripts/multinode_local.sh --config configs/tiny.toml [--section.key=value ...]
#
# Settings (environment): NPROC_PER_NODE (1), SUBNET (10.231.7: the test hosts get .1 and .2 on the veth
# only), PORT (29500), RDZV_TIMEOUT_S (60), PYTHON (.venv/bin/python). Needs root and iproute2; exits 77
# (skip) without them. The namespaces are removed on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
    echo "multinode_local.sh: needs root and iproute2 (ip netns) to make two test hosts" >&2
    exit 77
fi
python=${PYTHON:-.venv/bin/python}  # a venv's python, not resolved: the symlink is what selects the venv
nproc=${NPROC_PER_NODE:-1}
subnet=${SUBNET:-10.231.7}
port=${PORT:-29500}
tag="mc$$"  # unique per run, so concurrent runs do not collide
hosts=("${tag}a" "${tag}b")

cleanup() {
    for h in "${hosts[@]}"; do ip netns pids "$h" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
    for h in "${hosts[@]}"; do ip netns del "$h" 2>/dev/null || true; done
}
trap cleanup EXIT

for i in 0 1; do
    ip netns add "${hosts[$i]}" || { echo "multinode_local.sh: cannot create network namespaces here" >&2; exit 77; }
    ip -n "${hosts[$i]}" link set lo up
done
ip link add "${tag}0" netns "${hosts[0]}" type veth peer name "${tag}1" netns "${hosts[1]}"
for i in 0 1; do
    ip -n "${hosts[$i]}" addr add "$subnet.$((i + 1))/24" dev "${tag}$i"
    ip -n "${hosts[$i]}" link set "${tag}$i" up
done

pids=()
for i in 0 1; do
    # GLOO_SOCKET_IFNAME: gloo must talk over the veth, the only link between the two hosts. is_host: both
    # "hosts" share this machine's hostname, so torchrun cannot tell by name which one serves the rendezvous.
    ip netns exec "${hosts[$i]}" env GLOO_SOCKET_IFNAME="${tag}$i" NCCL_SOCKET_IFNAME="${tag}$i" \
        "$python" -m torch.distributed.run --nnodes=2 --nproc_per_node="$nproc" --node_rank="$i" \
        --rdzv-backend=c10d --rdzv-endpoint="$subnet.1:$port" --rdzv-id="$tag" \
        --rdzv-conf=join_timeout="${RDZV_TIMEOUT_S:-60}",is_host=$((i == 0)) --local-addr="$subnet.$((i + 1))" \
        -m train "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
