#!/usr/bin/env bash
# A throw-away, single-host MooseFS for tests and benchmarks.
#
#   scripts/moosefs.sh up|down|status|master-stop|master-start [STATE_DIR]
#
# The master and the chunkserver each run in their own network namespace
# (the chunkserver refuses a 127.x master), joined to the root namespace by a
# bridge on a private /24, so every packet stays on this host:
#   root ns  10.77.0.254  (bridge, used by mfsmount and the mfs* tools)
#   master   10.77.0.1    (netns labvm-mfsm)
#   chunk    10.77.0.2    (netns labvm-mfsc)
# Data lives under STATE_DIR (default /var/lib/labvm/mfs-test); the file
# system is mounted at STATE_DIR/mnt with nosuid,nodev, goal 1 and trash time 0 (setuid
# files and devices in layers still work through the overlay: see README, "What a user
# can reach").
# Clients must come from the root namespace's address (the hub, and the test bed's nodes,
# whose traffic is NATed to it) and know the password in STATE_DIR/mfs.password (0600,
# made once); the exports keep only its MD5. "up" is idempotent; "down" removes mounts,
# processes, namespaces and data; master-stop and master-start make an outage of the master.
set -euo pipefail

CMD=${1:-status}
STATE=${2:-${LABVM_MFS_DIR:-/var/lib/labvm/mfs-test}}
MNT="$STATE/mnt"
# The same file system again, read-only with long caches: what roots read their layer
# versions through (a node's cached_store_root; versions never change once published).
CACHED="$STATE/mnt-cached"
CACHED_OPTS=ro,nosuid,nodev,mfsattrcacheto=3600,mfsentrycacheto=3600,mfsnegentrycacheto=3600,mfsdirentrycacheto=3600
BR=labvmmfs0
NS_M=labvm-mfsm
NS_C=labvm-mfsc
NET=10.77.0
MASTER_IP=$NET.1
CHUNK_IP=$NET.2
ROOT_IP=$NET.254

log() { echo "moosefs.sh: $*" >&2; }
# grep on a captured string: "cmd | grep -q" can fail under pipefail (SIGPIPE).
contains() { grep -qF -- "$1" <<<"$2"; }
contains_word() { grep -qw -- "$1" <<<"$2"; }

ensure_packages() {
    local missing=()
    command -v mfsmaster >/dev/null || missing+=(moosefs-master)
    command -v mfschunkserver >/dev/null || missing+=(moosefs-chunkserver)
    command -v mfsmount >/dev/null || missing+=(moosefs-client)
    command -v mfssetgoal >/dev/null || missing+=(moosefs-cli moosefs-client)
    command -v ip >/dev/null || missing+=(iproute2)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null ||
            { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null; }
    fi
}

is_mounted() { mountpoint -q "${1:-$MNT}" 2>/dev/null; }

# A client mount whose mfsmount died (killed, or a machine restored from a snapshot)
# stays in the mount table and answers "Transport endpoint is not connected" to
# everything, so mkdir, mountpoint and rm all fail on it: detach it first.
clear_dead_mount() {
    local m=${1:-$MNT}
    awk -v m="$m" '$2 == m && $3 ~ /^fuse/ { found = 1 } END { exit !found }' /proc/mounts || return 0
    stat "$m" >/dev/null 2>&1 && return 0
    log "detaching the dead MooseFS mount at $m"
    umount -l "$m"
}

setup_net() {
    ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge
    contains "$ROOT_IP/" "$(ip addr show dev "$BR")" || ip addr add "$ROOT_IP/24" dev "$BR"
    ip link set "$BR" up
    # Docker sets the FORWARD policy to DROP and bridged frames pass iptables
    # (br_netfilter): allow traffic between ports of our bridge only.
    if command -v iptables >/dev/null; then
        iptables -C FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null ||
            iptables -I FORWARD -i "$BR" -o "$BR" -j ACCEPT
    fi
    local ns ipaddr tag
    for pair in "$NS_M:$MASTER_IP:m" "$NS_C:$CHUNK_IP:c"; do
        IFS=: read -r ns ipaddr tag <<<"$pair"
        contains_word "$ns" "$(ip netns list)" || ip netns add "$ns"
        ip netns exec "$ns" ip link set lo up
        if ! ip netns exec "$ns" ip link show eth0 >/dev/null 2>&1; then
            ip link del "lvmfs-$tag" >/dev/null 2>&1 || true
            ip link add "lvmfs-$tag" type veth peer name "lvmfs-${tag}p"
            ip link set "lvmfs-${tag}p" netns "$ns"
            ip netns exec "$ns" ip link set "lvmfs-${tag}p" name eth0
            ip link set "lvmfs-$tag" master "$BR" up
        fi
        contains "$ipaddr/" "$(ip netns exec "$ns" ip addr show dev eth0)" ||
            ip netns exec "$ns" ip addr add "$ipaddr/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
    done
}

write_configs() {
    mkdir -p "$STATE"/{master,chunk,hdd,mnt}
    chown -R mfs:mfs "$STATE/master" "$STATE/chunk" "$STATE/hdd" 2>/dev/null || true
    if [ ! -e "$STATE/master/metadata.mfs" ] && [ ! -e "$STATE/master/metadata.mfs.back" ]; then
        cp /var/lib/mfs/metadata.mfs.empty "$STATE/master/metadata.mfs" 2>/dev/null ||
            echo "MFSM NEW" >"$STATE/master/metadata.mfs"
        chown mfs:mfs "$STATE/master/metadata.mfs" 2>/dev/null || true
    fi
    if [ ! -s "$STATE/mfs.password" ]; then
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/mfs.password")
    fi
    chmod 600 "$STATE/mfs.password"
    local md5
    md5=$(head -n1 "$STATE/mfs.password" | tr -d '\n' | md5sum | cut -d' ' -f1)
    cat >"$STATE/mfsexports.cfg" <<EOF
$ROOT_IP / rw,alldirs,admin,maproot=0:0,md5pass=$md5
EOF
    : >"$STATE/mfstopology.cfg"
    cat >"$STATE/mfsmaster.cfg" <<EOF
DATA_PATH = $STATE/master
EXPORTS_FILENAME = $STATE/mfsexports.cfg
TOPOLOGY_FILENAME = $STATE/mfstopology.cfg
MATOML_LISTEN_HOST = $MASTER_IP
MATOCS_LISTEN_HOST = $MASTER_IP
MATOCL_LISTEN_HOST = $MASTER_IP
ATIME_MODE = 4
EOF
    echo "$STATE/hdd" >"$STATE/mfshdd.cfg"
    cat >"$STATE/mfschunkserver.cfg" <<EOF
DATA_PATH = $STATE/chunk
HDD_CONF_FILENAME = $STATE/mfshdd.cfg
MASTER_HOST = $MASTER_IP
CSSERV_LISTEN_HOST = $CHUNK_IP
HDD_LEAVE_SPACE_DEFAULT = 1GiB
EOF
}

ns_running() { # ns name -> true if the daemon's pid file process lives
    local ns=$1 prog=$2 p
    for p in $(ip netns pids "$ns" 2>/dev/null); do
        [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$prog" ] && return 0
    done
    return 1
}

up() {
    ensure_packages
    modprobe fuse 2>/dev/null || true
    setup_net
    clear_dead_mount
    clear_dead_mount "$CACHED"
    write_configs
    if ! ns_running "$NS_M" mfsmaster; then
        ip netns exec "$NS_M" mfsmaster -a -c "$STATE/mfsmaster.cfg" start >"$STATE/master.log" 2>&1 ||
            { cat "$STATE/master.log" >&2; exit 1; }
    else  # exports may have changed
        ip netns exec "$NS_M" mfsmaster -c "$STATE/mfsmaster.cfg" reload >/dev/null 2>&1 || true
    fi
    if ! ns_running "$NS_C" mfschunkserver; then
        ip netns exec "$NS_C" mfschunkserver -c "$STATE/mfschunkserver.cfg" start >"$STATE/chunk.log" 2>&1 ||
            { cat "$STATE/chunk.log" >&2; exit 1; }
    fi
    if ! is_mounted; then
        local i
        for i in $(seq 1 30); do
            # -p reads the password from stdin: it never shows in a command line (this
            # mfsmount's mfspassfile= option does not work).
            mfsmount "$MNT" -H "$MASTER_IP" -p \
                -o nosuid,nodev,mfsattrcacheto=0,mfsentrycacheto=0,mfsdirentrycacheto=0 \
                <"$STATE/mfs.password" >"$STATE/mount.log" 2>&1 && break
            sleep 1
        done
        is_mounted || { cat "$STATE/mount.log" >&2; log "mount failed"; exit 1; }
    fi
    # Writes need a registered chunkserver with space: wait until a write succeeds.
    local i ok=0
    for i in $(seq 1 60); do
        if [ "$(stat -f -c %b "$MNT" 2>/dev/null || echo 0)" != 0 ] &&
            timeout 10 sh -c "echo ok >'$MNT/.labvm-probe' && sync '$MNT/.labvm-probe'" 2>/dev/null &&
            [ "$(cat "$MNT/.labvm-probe" 2>/dev/null)" = ok ]; then
            ok=1
            break
        fi
        sleep 1
    done
    rm -f "$MNT/.labvm-probe"
    [ $ok = 1 ] || { log "chunkserver never became writable"; exit 1; }
    if ! is_mounted "$CACHED"; then
        mkdir -p "$CACHED"
        mfsmount "$CACHED" -H "$MASTER_IP" -p -o "$CACHED_OPTS" <"$STATE/mfs.password" \
            >"$STATE/mount-cached.log" 2>&1 || { cat "$STATE/mount-cached.log" >&2; exit 1; }
    fi
    mfssetgoal -r 1 "$MNT" >/dev/null
    mfssettrashtime -r 0 "$MNT" >/dev/null
    echo "$MNT"
}

down() {
    local m
    for m in "$CACHED" "$MNT"; do
        clear_dead_mount "$m"
        if is_mounted "$m"; then umount "$m" 2>/dev/null || umount -l "$m"; fi
    done
    local ns prog
    for ns in "$NS_C" "$NS_M"; do
        if contains_word "$ns" "$(ip netns list)"; then
            prog=mfschunkserver
            [ "$ns" = "$NS_M" ] && prog=mfsmaster
            if [ -e "$STATE/mfs$([ $prog = mfsmaster ] && echo master || echo chunkserver).cfg" ]; then
                timeout 60 ip netns exec "$ns" "$prog" -c \
                    "$STATE/mfs$([ $prog = mfsmaster ] && echo master || echo chunkserver).cfg" stop \
                    >/dev/null 2>&1 || true
            fi
            local p
            for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    ip link del lvmfs-m >/dev/null 2>&1 || true
    ip link del lvmfs-c >/dev/null 2>&1 || true
    ip link del "$BR" >/dev/null 2>&1 || true
    if command -v iptables >/dev/null; then
        while iptables -D FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null; do :; done
    fi
    case "$STATE" in
    / | "") ;;
    *) rm -rf --one-file-system "$STATE" ;;
    esac
}

# An outage of the master (an upgrade, say): clients block until it is back.
master_stop() {
    ip netns exec "$NS_M" mfsmaster -c "$STATE/mfsmaster.cfg" stop >>"$STATE/master.log" 2>&1 || true
    local i
    for i in $(seq 1 100); do ns_running "$NS_M" mfsmaster || return 0; sleep 0.1; done
    log "the master did not stop"; return 1
}

master_start() {
    ns_running "$NS_M" mfsmaster && return 0
    ip netns exec "$NS_M" mfsmaster -a -c "$STATE/mfsmaster.cfg" start >>"$STATE/master.log" 2>&1 ||
        { tail -n 20 "$STATE/master.log" >&2; return 1; }
}

status() {
    local rc=0
    if ns_running "$NS_M" mfsmaster; then echo "master: running ($MASTER_IP)"; else echo "master: stopped"; rc=1; fi
    if ns_running "$NS_C" mfschunkserver; then echo "chunkserver: running ($CHUNK_IP)"; else echo "chunkserver: stopped"; rc=1; fi
    if is_mounted; then echo "mount: $MNT"; else echo "mount: none"; rc=1; fi
    if is_mounted "$CACHED"; then echo "cached mount: $CACHED"; else echo "cached mount: none"; rc=1; fi
    return $rc
}

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 2; }
case "$CMD" in
up) up ;;
down) down ;;
status) status ;;
master-stop) master_stop ;;
master-start) master_start ;;
*)
    echo "usage: $0 up|down|status|master-stop|master-start [STATE_DIR]" >&2
    exit 2
    ;;
esac
