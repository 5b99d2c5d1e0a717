#!/usr/bin/env bash
# A multi-node LabVM test bed on one machine, as root:
#   scripts/testbed.sh up [NODE...]     (default nodes: a b)
#   scripts/testbed.sh down
#   scripts/testbed.sh status
#
# Each node is a network namespace labvm-<node> joined to the bridge labvm-tb0
# (10.78.0.1/24 in the root namespace) by a veth pair, with its own dockerd
# (its own data-root, exec-root and socket /run/labvm-testbed/<node>/docker.sock,
# userns-remap on) and its own local disk directory /var/lib/labvm-testbed/<node>.
# dockerd is started with nsenter --net: `ip netns exec` would hide the cgroup mounts.
# Traffic stays on this machine: only loopback and these namespaces' addresses, plus
# the NAT the nodes' containers need to reach the package registries for apt.
set -euo pipefail

BR=labvm-tb0
NET=10.78.0
STATE=/var/lib/labvm-testbed
RUN=/run/labvm-testbed

node_index() {  # a -> 11, b -> 12, ...
  local n=$1
  printf '%d' $(( $(printf '%d' "'${n:0:1}") - 97 + 11 ))
}

up_bridge() {
  if ! ip link show "$BR" >/dev/null 2>&1; then
    ip link add "$BR" type bridge
    ip addr add "$NET.1/24" dev "$BR"
  fi
  ip link set "$BR" up
  sysctl -qw net.ipv4.ip_forward=1
  iptables -t nat -C POSTROUTING -s "$NET.0/24" ! -d "$NET.0/24" -j MASQUERADE 2>/dev/null ||
    iptables -t nat -A POSTROUTING -s "$NET.0/24" ! -d "$NET.0/24" -j MASQUERADE
  iptables -C FORWARD -i "$BR" -j ACCEPT 2>/dev/null || iptables -I FORWARD -i "$BR" -j ACCEPT
  iptables -C FORWARD -o "$BR" -j ACCEPT 2>/dev/null || iptables -I FORWARD -o "$BR" -j ACCEPT
}

up_node() {
  local n=$1 ns=labvm-$1 idx
  idx=$(node_index "$n")
  local ip=$NET.$idx
  if ! ip netns list | grep -qw "$ns"; then
    ip netns add "$ns"
    ip link add "tb-$n" type veth peer name eth0 netns "$ns"
    ip link set "tb-$n" master "$BR" up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$NET.1"
  fi
  mkdir -p "$STATE/$n/docker" "$STATE/$n/labvm" "$RUN/$n/exec"
  local sock=$RUN/$n/docker.sock
  if ! DOCKER_HOST=unix://$sock docker info >/dev/null 2>&1; then
    setsid nohup nsenter --net=/var/run/netns/"$ns" dockerd \
      --data-root "$STATE/$n/docker" --exec-root "$RUN/$n/exec" \
      --pidfile "$RUN/$n/dockerd.pid" -H "unix://$sock" \
      --userns-remap default --live-restore --storage-driver overlay2 \
      >"$STATE/$n/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
      DOCKER_HOST=unix://$sock docker info >/dev/null 2>&1 && break
      sleep 1
    done
    DOCKER_HOST=unix://$sock docker info >/dev/null 2>&1 ||
      { echo "dockerd of node $n did not start; see $STATE/$n/dockerd.log" >&2; exit 1; }
  fi
  echo "node $n: netns $ns, address $ip, docker unix://$sock, disk $STATE/$n/labvm"
}

down_node() {
  local n=$1 pidfile=$RUN/$1/dockerd.pid
  if [[ -f $pidfile ]]; then
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  # dockerd leaves its mounts behind when killed; nothing of a node may outlive it.
  { grep -E " ($STATE/$n|$RUN/$n)" /proc/self/mountinfo || true; } | awk '{print $5}' |
    sort -r | while read -r mp; do umount -l "$mp" 2>/dev/null || true; done
  ip netns del "labvm-$n" 2>/dev/null || true
  ip link del "tb-$n" 2>/dev/null || true
  rm -rf "${RUN:?}/$n"
}

nodes_present() {
  { ip netns list 2>/dev/null || true; } | awk '{print $1}' | sed -n 's/^labvm-\([a-z]\)$/\1/p'
  # a node whose namespace is gone may still have a dockerd
  ls "$RUN" 2>/dev/null || true
}

case "${1:-}" in
  up)
    shift
    nodes=("$@")
    ((${#nodes[@]})) || nodes=(a b)
    up_bridge
    for n in "${nodes[@]}"; do
      [[ $n =~ ^[a-z]$ ]] || { echo "node names are single letters a-z, got '$n'" >&2; exit 2; }
      up_node "$n"
    done
    ;;
  down)
    for n in $(nodes_present | sort -u); do down_node "$n"; done
    iptables -t nat -D POSTROUTING -s "$NET.0/24" ! -d "$NET.0/24" -j MASQUERADE 2>/dev/null || true
    iptables -D FORWARD -i "$BR" -j ACCEPT 2>/dev/null || true
    iptables -D FORWARD -o "$BR" -j ACCEPT 2>/dev/null || true
    ip link del "$BR" 2>/dev/null || true
    ;;
  status)
    for n in $(nodes_present | sort -u); do
      sock=$RUN/$n/docker.sock
      if DOCKER_HOST=unix://$sock docker info >/dev/null 2>&1; then s=up; else s=down; fi
      echo "node $n: dockerd $s"
    done
    ;;
  *)
    echo "usage: $0 up [NODE...] | down | status" >&2
    exit 2
    ;;
esac
