#!/bin/sh
# Joins Redis nodes into one cluster of masters, once: compose's cluster-init service
# runs it on every `up`, so it must also be right for a cluster formed before.
#
#   cluster-init.sh host:port host:port host:port...
#
# First start: no node has slots yet, so `redis-cli --cluster create` assigns them.
# Later starts: the cluster exists in each node's nodes.conf, but a recreated container
# may have come back on a new address, which its peers do not know. A CLUSTER MEET of a
# node the cluster already knows by id updates that node's address, so every node meets
# every other at its address now. Either way it exits 0 only once the cluster is ok.
# REDIS_CLI names the client binary (redis-cli by default; valkey-cli works too).
set -eu

[ "$#" -ge 3 ] || { echo "usage: $0 host:port host:port host:port..." >&2; exit 2; }
cli=${REDIS_CLI:-redis-cli}
wait_seconds=${CLUSTER_INIT_TIMEOUT:-60}

at() { # at host:port command... : one command on one node
    node=$1
    shift
    "$cli" -h "${node%:*}" -p "${node##*:}" "$@"
}

field() { # field host:port name : one field of that node's CLUSTER INFO
    at "$1" cluster info | tr -d '\r' | sed -n "s/^$2://p"
}

address() { # address host : its IP address, which CLUSTER MEET needs
    case $1 in
        *[!0-9.]*) getent hosts "$1" | awk '{ print $1; exit }' ;;
        *) echo "$1" ;;
    esac
}

deadline=$(($(date +%s) + wait_seconds))
until_deadline() {
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "cluster-init: $1 within ${wait_seconds}s" >&2
        exit 1
    fi
    sleep 1
}

for node in "$@"; do
    until at "$node" ping 2>/dev/null | grep -q PONG; do until_deadline "no answer from $node"; done
done

if [ "$(field "$1" cluster_slots_assigned)" = 0 ]; then
    echo "cluster-init: creating a cluster of $# masters"
    "$cli" --cluster create "$@" --cluster-yes
else
    echo "cluster-init: formed before; reintroducing every node at its address now"
    for node in "$@"; do
        ip=$(address "${node%:*}")
        for peer in "$@"; do
            [ "$peer" = "$node" ] || at "$peer" cluster meet "$ip" "${node##*:}" >/dev/null
        done
    done
fi

for node in "$@"; do
    until [ "$(field "$node" cluster_state)" = ok ] \
        && [ "$(field "$node" cluster_known_nodes)" = "$#" ]; do
        until_deadline "cluster not ok on $node"
    done
done
echo "cluster-init: cluster ok on $# nodes"
