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
#   supernode-K.key, .pub         SuperNode authentication keys (ECDSA P-384, OpenSSH format,
#                                 as `flower-supernode --auth-supernode-private-key` and
#                                 `flwr supernode register` expect them)
#
# Usage: docker/generate-certs.sh [--supernodes N] [--days D] [--owner UID:GID] [--force]
#   --owner   chown the key files to the containers' user (49999:49999 for Flower's images) and
#             make them readable by it alone (needs root). Without it, the files are made
#             readable by everyone (0644) so that the containers can read them: fine for a demo
#             on your own machine, not for a shared host.
#   --force   overwrite existing files (otherwise an existing ca.crt stops the script).
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
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "ssh-keygen (openssh-client) is needed" >&2; exit 1; }

mkdir -p "$out"
if [ -e "$out/ca.crt" ] && [ "$force" -ne 1 ]; then
    echo "$out/ca.crt exists; keeping the certificates there (use --force to replace them)."
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
umask 077

# The CA.
openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$days" \
    -subj "/O=FedTAN demo/CN=FedTAN demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null

# A server certificate signed by the CA: issue NAME CN SAN...
issue() {
    local name="$1" cn="$2"; shift 2
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
}
issue superlink superlink DNS:superlink DNS:localhost IP:127.0.0.1 IP:::1
node_sans=()
for i in $(seq 1 "$supernodes"); do node_sans+=("DNS:supernode-$i"); done
issue supernode supernode "${node_sans[@]}" DNS:localhost IP:127.0.0.1

# SuperNode authentication keys.
for i in $(seq 1 "$supernodes"); do
    rm -f "$out/supernode-$i.key" "$out/supernode-$i.key.pub" "$out/supernode-$i.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$out/supernode-$i.key"
    mv "$out/supernode-$i.key.pub" "$out/supernode-$i.pub"
done

# Who may read what. The CA key is never mounted into a container.
chmod 0755 "$out"
chmod 0644 "$out"/*.crt "$out"/*.pub
chmod 0600 "$out/ca.key"
container_keys=("$out/superlink.key" "$out/supernode.key")
for i in $(seq 1 "$supernodes"); do container_keys+=("$out/supernode-$i.key"); done
if [ -n "$owner" ]; then
    chown "$owner" "${container_keys[@]}"
    chmod 0400 "${container_keys[@]}"
else
    chmod 0644 "${container_keys[@]}"
    echo "note: private keys in $out are world-readable so that the containers (UID 49999) can"
    echo "      read them; rerun as root with --force --owner 49999:49999 to restrict them."
fi

openssl verify -CAfile "$out/ca.crt" "$out/superlink.crt" "$out/supernode.crt" >/dev/null
echo "certificates and keys for 1 SuperLink and $supernodes SuperNodes are in $out"
