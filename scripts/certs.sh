#!/usr/bin/env bash
# Makes a throw-away CA and raft_kv node certificates with OpenSSL (3.0 or later).
#
#   scripts/certs.sh DIR CLUSTER ID...
#
# DIR/ca.pem and DIR/ca.key (kept if they exist: new nodes join the same CA), and for each ID
# DIR/nodeID.pem and DIR/nodeID.key. A node certificate names the node twice: the URI SAN
# raft-kv://CLUSTER/node/ID (its identity) and the DNS SAN node-ID.CLUSTER.raft-kv (the server
# name a peer asks for when it dials it). CLUSTER: lower-case letters, digits and '-'.
# For production, sign the same two names with your own CA and keep its key offline.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 DIR CLUSTER ID..." >&2; exit 2; }
dir=$1 cluster=$2; shift 2
[[ "$cluster" =~ ^[a-z0-9-]{1,63}$ ]] || { echo "certs.sh: cluster name must match [a-z0-9-]{1,63}" >&2; exit 2; }
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=raft_kv $cluster CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
fi
for id in "$@"; do
  [[ "$id" =~ ^[1-9][0-9]*$ ]] || { echo "certs.sh: node id must be a positive integer, got '$id'" >&2; exit 2; }
  openssl req -x509 -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -nodes -days 825 -subj "/CN=node-$id" -keyout "$dir/node$id.key" -out "$dir/node$id.pem" \
    -addext "basicConstraints=critical,CA:FALSE" -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth,clientAuth" \
    -addext "subjectAltName=URI:raft-kv://$cluster/node/$id,DNS:node-$id.$cluster.raft-kv" 2>/dev/null
done
chmod 644 "$dir"/ca.pem "$dir"/node*.pem
