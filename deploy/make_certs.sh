#!/usr/bin/env bash
# Make a private CA and a SuperLink server certificate for a fedal deployment.
#
#   deploy/make_certs.sh OUT_DIR [HOST_OR_IP ...]
#
# Writes OUT_DIR/ca.crt (give it to every SuperNode and to `flwr`), OUT_DIR/ca.key
# (keep offline), OUT_DIR/server.crt and OUT_DIR/server.key (the SuperLink's).
# The server certificate is valid for localhost, 127.0.0.1, ::1 and every extra
# HOST_OR_IP given (the SuperLink's public name or address in a real deployment).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ? 2 : 0 ))
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl is not installed (apt-get install openssl)" >&2; exit 2; }

out=$1; shift
mkdir -p "$out"
umask 077

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days 365 -subj "/CN=fedal deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.crt"

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/server.key"
openssl req -new -key "$out/server.key" -subj "/CN=fedal-superlink" -out "$out/server.csr"
cat > "$out/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$out/server.ext" -out "$out/server.crt" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.crt"
echo "certificates in $out: ca.crt server.crt server.key (SAN $san)"
