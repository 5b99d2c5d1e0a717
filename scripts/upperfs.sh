#!/usr/bin/env bash
# A node's upper file system: a btrfs with quotas on, mounted at STATE_DIR/uppers, so
# that each root's writable layer (a subvolume) can have a disk quota
# (labvm_spawner/node/quota.py says why btrfs). One user filling their quota then gets
# "Disk quota exceeded" while the node's own disk, the hub's database and every other
# user keep working.
#
#   scripts/upperfs.sh up [STATE_DIR] [SIZE]   make (once) and mount it; idempotent
#   scripts/upperfs.sh down [STATE_DIR]        unmount it (the data stays)
#   scripts/upperfs.sh status [STATE_DIR]
#
# By default the file system lives in a sparse file, STATE_DIR/uppers.img, of SIZE
# (default: 80% of the free space where it goes, at most 1T); it takes disk only as
# users write. On a production node give it a disk or partition of its own:
# LABVM_UPPERS_DEVICE=/dev/sdb1 (made btrfs only if it holds no file system yet).
# It is mounted nosuid,nodev: setuid files in uppers still work through the overlay.
# "up" prints the /etc/fstab line that mounts it at boot.
set -euo pipefail

CMD=${1:-status}
STATE=${2:-${LABVM_STATE_DIR:-/var/lib/labvm}}
SIZE=${3:-}
MNT="$STATE/uppers"
IMG="$STATE/uppers.img"
DEV=${LABVM_UPPERS_DEVICE:-}
OPTS=nosuid,nodev,noatime

log() { echo "upperfs.sh: $*" >&2; }
die() { log "$*"; exit 1; }

mount_line() { awk -v m="$MNT" '$2 == m { print $3, $4 }' /proc/mounts | tail -1; }

is_quota_fs() {
    [[ "$(mount_line)" == btrfs\ * ]] && btrfs qgroup show "$MNT" >/dev/null 2>&1
}

default_size() {
    local free
    free=$(df --output=avail -B1 "$STATE" | tail -1)
    local size=$((free / 10 * 8))
    ((size > 1 << 40)) && size=$((1 << 40))
    echo "$size"
}

up() {
    command -v mkfs.btrfs >/dev/null || die "mkfs.btrfs is missing: apt-get install btrfs-progs"
    mkdir -p "$STATE"
    if [ -n "$(mount_line)" ]; then
        [[ "$(mount_line)" == btrfs\ * ]] || die "$MNT is mounted but is not a btrfs: $(mount_line)"
        is_quota_fs || btrfs quota enable "$MNT"
        echo "$MNT"
        return
    fi
    if [ -d "$MNT" ] && [ -n "$(ls -A "$MNT")" ]; then
        die "$MNT already holds uppers on the node's disk; stop their servers and move them \
aside before putting a quota file system there"
    fi
    local src
    if [ -n "$DEV" ]; then
        [ -b "$DEV" ] || die "LABVM_UPPERS_DEVICE=$DEV is not a block device"
        local have
        have=$(blkid -o value -s TYPE "$DEV" 2>/dev/null || true)
        if [ -z "$have" ]; then
            mkfs.btrfs -q "$DEV"
        elif [ "$have" != btrfs ]; then
            die "$DEV holds a $have file system; LabVM formats only an empty device"
        fi
        src=$DEV
    else
        if [ ! -e "$IMG" ]; then
            local bytes
            if [ -n "$SIZE" ]; then bytes=$(numfmt --from=iec "${SIZE%B}"); else bytes=$(default_size); fi
            ((bytes >= 256 << 20)) || die "an upper file system needs at least 256M (asked: ${SIZE:-$bytes})"
            truncate -s "$bytes" "$IMG.tmp"
            mkfs.btrfs -q "$IMG.tmp" >/dev/null
            mv "$IMG.tmp" "$IMG"
        fi
        chmod 600 "$IMG"
        src=$IMG
        OPTS="loop,$OPTS"
    fi
    mkdir -p "$MNT"
    mount -t btrfs -o "$OPTS" "$src" "$MNT"
    chmod 700 "$MNT"
    btrfs quota enable "$MNT"
    is_quota_fs || { umount "$MNT"; die "btrfs quotas did not come on at $MNT"; }
    log "mounted $src at $MNT; to mount it at boot, add to /etc/fstab:"
    log "  $src $MNT btrfs $OPTS 0 0"
    echo "$MNT"
}

down() {
    [ -n "$(mount_line)" ] || return 0
    umount "$MNT" || die "$MNT is busy: stop the servers of this node first"
}

status() {
    if is_quota_fs; then
        echo "uppers: $MNT (btrfs, quotas on)"
        df -h --output=size,used,avail "$MNT" | tail -1
    elif [ -n "$(mount_line)" ]; then
        echo "uppers: $MNT ($(mount_line)): no quotas"
        return 1
    else
        echo "uppers: $MNT is on the node's disk: no disk quotas"
        return 1
    fi
}

[ "$(id -u)" = 0 ] || die "must run as root"
case "$CMD" in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: $0 up|down|status [STATE_DIR] [SIZE]" >&2
    exit 2
    ;;
esac
