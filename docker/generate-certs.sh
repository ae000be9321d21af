#!/usr/bin/env bash
# Make the certificates and keys that docker/with-tls.yml mounts, in docker/certs/ (git-ignored;
# never commit them):
#   ca.crt, ca.key                a private CA (ca.key is only needed to sign; keep it away
#                                 from the containers)
#   superlink.crt, superlink.key  the SuperLink's TLS server certificate (Fleet, Control and
#                                 ServerApp APIs share one port in Flower 1.42); SANs: the
#                                 compose service name `superlink`, localhost, 127.0.0.1, ::1
#   supernode.crt, supernode.key  TLS certificate of the SuperNodes' ClientApp API (what each
#                                 SuperExec connects to); SANs: supernode-1..N, localhost
#   bn-sync.crt, bn-sync.key      TLS certificate of FedTAN's BN sync service (transport =
#                                 "grpc", docker/with-grpc.yml), which the ServerApp serves in
#                                 the superexec-serverapp container; SANs: superexec-serverapp
#                                 (the compose service name the clients dial), localhost,
#                                 127.0.0.1
#   supernode-K.key, .pub         SuperNode authentication keys (ECDSA P-384, OpenSSH format,
#                                 as `flower-supernode --auth-supernode-private-key` and
#                                 `flwr supernode register` expect them)
#
# Usage: docker/generate-certs.sh [--supernodes N] [--days D] [--owner UID:GID] [--force]
#   --owner   chown the key files to the containers' user (49999:49999 for Flower's images) and
#             make them readable by it alone (needs root). Without it, the files are made
#             readable by everyone (0644) so that the containers can read them: fine for a demo
#             on your own machine, not for a shared host.
#   --force   replace everything, CA included. Without it an existing CA (ca.crt, ca.key) is
#             kept and only missing files are made (e.g. bn-sync.crt for a folder made before
#             it existed); the files that exist stay as they are.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${FEDTAN_CERTS_DIR:-$here/certs}"
supernodes=3
days=365
owner=""
force=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --supernodes) supernodes="$2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        --owner) owner="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "ssh-keygen (openssh-client) is needed" >&2; exit 1; }

mkdir -p "$out"
# missing NAME: true if this run has to make NAME (always with --force or a new CA).
new_ca=1
if [ -e "$out/ca.crt" ] && [ "$force" -ne 1 ]; then new_ca=0; fi
missing() { [ "$new_ca" -eq 1 ] || [ ! -e "$out/$1" ]; }
todo=()
for f in superlink.crt supernode.crt bn-sync.crt; do missing "$f" && todo+=("$f"); done
for i in $(seq 1 "$supernodes"); do missing "supernode-$i.pub" && todo+=("supernode-$i.pub"); done
if [ "$new_ca" -eq 0 ]; then
    if [ "${#todo[@]}" -eq 0 ]; then
        echo "$out has every certificate and key; keeping them (use --force to replace them)."
        exit 0
    fi
    [ -r "$out/ca.key" ] || {
        echo "$out/ca.crt exists but ca.key is not readable: cannot add ${todo[*]}" >&2
        echo "(run as its owner, or --force to replace everything)" >&2
        exit 1
    }
    echo "keeping the CA and the files in $out; adding ${todo[*]}"
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
umask 077
made_keys=()    # private keys made by this run, for the ownership and modes below
made_public=()

# The CA.
if [ "$new_ca" -eq 1 ]; then
    openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$days" \
        -subj "/O=FedTAN demo/CN=FedTAN demo CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
    made_public+=("$out/ca.crt")
fi

# A server certificate signed by the CA, if this run has to make it: issue NAME CN SAN...
issue() {
    local name="$1" cn="$2"; shift 2
    missing "$name.crt" || return 0
    local sans
    sans="$(IFS=,; echo "$*")"
    openssl req -new -newkey rsa:2048 -sha256 -nodes -subj "/O=FedTAN demo/CN=$cn" \
        -keyout "$out/$name.key" -out "$tmp/$name.csr" 2>/dev/null
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=$sans" > "$tmp/$name.ext"
    openssl x509 -req -sha256 -days "$days" -in "$tmp/$name.csr" \
        -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -CAserial "$tmp/ca.srl" \
        -extfile "$tmp/$name.ext" -out "$out/$name.crt" 2>/dev/null
    made_keys+=("$out/$name.key")
    made_public+=("$out/$name.crt")
}
issue superlink superlink DNS:superlink DNS:localhost IP:127.0.0.1 IP:::1
node_sans=()
for i in $(seq 1 "$supernodes"); do node_sans+=("DNS:supernode-$i"); done
issue supernode supernode "${node_sans[@]}" DNS:localhost IP:127.0.0.1
# FedTAN's BN sync service: docker/with-grpc.yml advertises superexec-serverapp:PORT.
issue bn-sync superexec-serverapp DNS:superexec-serverapp DNS:localhost IP:127.0.0.1

# SuperNode authentication keys.
for i in $(seq 1 "$supernodes"); do
    missing "supernode-$i.pub" || continue
    rm -f "$out/supernode-$i.key" "$out/supernode-$i.key.pub" "$out/supernode-$i.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$out/supernode-$i.key"
    mv "$out/supernode-$i.key.pub" "$out/supernode-$i.pub"
    made_keys+=("$out/supernode-$i.key")
    made_public+=("$out/supernode-$i.pub")
done

# Who may read what (for what this run made; existing files keep their modes). The CA key is
# never mounted into a container.
if [ "$new_ca" -eq 1 ]; then
    chmod 0755 "$out"
    chmod 0600 "$out/ca.key"
fi
chmod 0644 "${made_public[@]}"
if [ "${#made_keys[@]}" -gt 0 ]; then
    if [ -n "$owner" ]; then
        chown "$owner" "${made_keys[@]}"
        chmod 0400 "${made_keys[@]}"
    else
        chmod 0644 "${made_keys[@]}"
        echo "note: private keys in $out are world-readable so that the containers (UID 49999)"
        echo "      can read them; rerun as root with --force --owner 49999:49999 to restrict them."
    fi
fi

openssl verify -CAfile "$out/ca.crt" "$out/superlink.crt" "$out/supernode.crt" \
    "$out/bn-sync.crt" >/dev/null
echo "certificates and keys for 1 SuperLink, $supernodes SuperNodes and the BN sync service" \
    "are in $out"
