#!/usr/bin/env bash
# Prints every numeric figure of two `shardline-loadtest bench all --json`
# reports side by side with its change, so a change can show its effect:
#   scripts/bench-compare.sh bench/baseline.json new.json
# Figures present in only one report are listed as such. Exit 2 on bad
# input (a missing or unreadable file, or JSON that is not such a report).
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 OLD.json NEW.json (reports of shardline-loadtest bench all --json)" >&2
    exit 2
fi
exec python3 - "$1" "$2" <<'PY'
import json, sys

def load(path):
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: {e}")
    if not isinstance(report, dict) or not isinstance(report.get("benches"), dict):
        print(f"error: {path} is not a `bench all` report (no \"benches\" object)", file=sys.stderr)
        sys.exit(2)
    return report

def figures(value, prefix=""):
    """Every number under `value`, keyed by its dotted path."""
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(figures(v, f"{prefix}.{k}" if prefix else k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(figures(v, f"{prefix}[{i}]"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out

try:
    old, new = load(sys.argv[1]), load(sys.argv[2])
except SystemExit as e:
    if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
        sys.exit(2)
    raise
for side, r in (("old", old), ("new", new)):
    print(f"{side}: commit {r.get('commit')}, machine {json.dumps(r.get('machine'))}")
a, b = figures(old["benches"]), figures(new["benches"])
width = max((len(k) for k in a.keys() | b.keys()), default=10)
print(f"{'figure':<{width}} {'old':>14} {'new':>14} {'change':>9}")
for key in sorted(a.keys() | b.keys()):
    if key not in a:
        print(f"{key:<{width}} {'-':>14} {b[key]:>14.6g} {'new':>9}")
    elif key not in b:
        print(f"{key:<{width}} {a[key]:>14.6g} {'-':>14} {'gone':>9}")
    else:
        x, y = a[key], b[key]
        change = "=" if x == y else ("n/a" if x == 0 else f"{(y - x) / abs(x) * 100:+.1f}%")
        print(f"{key:<{width}} {x:>14.6g} {y:>14.6g} {change:>9}")
PY
