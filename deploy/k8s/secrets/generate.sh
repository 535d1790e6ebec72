#!/usr/bin/env bash
# Writes the files deploy/k8s/secrets/kustomization.yaml turns into
# Secrets: three random tokens, a CA and the coordinator's certificate
# (valid for the Service, each coordinator pod by name, and localhost for
# `kubectl exec ... shardline`), and the PostgreSQL URL.
#
#   generate.sh [DIR]     DIR defaults to this script's directory
#
# Env: NAMESPACE (shardline), POSTGRES_URL (a placeholder for the
# postgres component; set yours), DAYS (825). Files that exist are kept,
# so running it again never rotates anything: delete a file to renew it.
set -euo pipefail
dir="${1:-$(cd "$(dirname "$0")" && pwd)}"
ns="${NAMESPACE:-shardline}"
days="${DAYS:-825}"
command -v openssl >/dev/null || { echo "generate.sh: needs openssl" >&2; exit 2; }
mkdir -p "$dir"
cd "$dir"
umask 077

for role in admin worker viewer; do
  [[ -s "$role-token" ]] || openssl rand -hex 32 >"$role-token"
done

if [[ ! -s ca.crt || ! -s ca.key ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=shardline CA" -keyout ca.key -out ca.crt 2>/dev/null
  rm -f tls.crt tls.key
fi
if [[ ! -s tls.crt || ! -s tls.key ]]; then
  svc="shardline-coordinator" peers="shardline-coordinator-peers"
  sans="DNS:$svc,DNS:$svc.$ns,DNS:$svc.$ns.svc,DNS:$svc.$ns.svc.cluster.local"
  sans+=",DNS:*.$peers,DNS:*.$peers.$ns,DNS:*.$peers.$ns.svc,DNS:*.$peers.$ns.svc.cluster.local"
  sans+=",DNS:localhost,IP:127.0.0.1"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$svc" \
    -keyout tls.key -out tls.csr 2>/dev/null
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$sans") \
    -out tls.crt 2>/dev/null
  rm -f tls.csr ca.srl
fi

[[ -s postgres-url ]] || printf '%s' \
  "${POSTGRES_URL:-postgres://shardline:CHANGE-ME@postgres:5432/shardline?sslmode=require}" >postgres-url
echo "secrets written to $dir (apply: kubectl apply -k $dir)"
