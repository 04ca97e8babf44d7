#!/usr/bin/env python3
"""Writes RELIABILITY.md from what scripts/faults.sh collected.

usage: bench/faults/report.py RUN_DIR RESULTS_DIR OUT

RUN_DIR holds, per run of a case, <case>-<k>.json (the loadtest report),
.meta.json (fault times, whether the cluster came back by itself), .warn
(WARN and ERROR log lines of the gateways and the backend during the run),
.cmd (the command), and for slow-consumer .slow.json and .firehose.json;
machine.env describes the machine. The reports (without their per-second
series) and the metadata are copied to RESULTS_DIR, and OUT is written.
Hand-written notes on the causes of what the tables show, when known,
come from bench/faults/notes.md (one "## <case>" section per case).
Only what was measured is written: a case that did not run is left out.
"""

import glob
import json
import os
import re
import sys

run_dir, results_dir, out = sys.argv[1:4]
here = os.path.dirname(os.path.abspath(__file__))

CASES = [
    ("rabbit-restart", "RabbitMQ restart", "the node stopped (`rabbitmqctl stop`) and started again"),
    ("rabbit-close-all", "all broker connections cut", "`rabbitmqctl close_all_connections`: gateways, publisher and backend"),
    ("rabbit-close-gateways", "the gateways' broker connections cut", "`rabbitmqctl close_connection` for each connection of a gateway process"),
    ("redis-restart-4", "Redis down ~4 s", "`shutdown nosave`, 4 s, started again empty"),
    ("redis-restart-10", "Redis down ~10 s", "`shutdown nosave`, 10 s, started again empty"),
    ("pg-restart", "PostgreSQL restart (end to end)", "`pg_ctl stop -m fast`, 3 s, start; posts through the backend"),
    ("backend-kill", "backend SIGKILL during posts (end to end)", "SIGKILL, started again 1 s later; posts through the backend"),
    ("gateway-kill", "gateway SIGKILL", "one of 3 gateways SIGKILLed, started again (same node id) 5 s later"),
    ("gateway-stop-8", "gateway SIGSTOP 8 s", "one of 3 gateways SIGSTOPped, SIGCONT 8 s later"),
    ("gateway-stop-30", "gateway SIGSTOP 30 s", "one of 3 gateways SIGSTOPped, SIGCONT 30 s later"),
    ("rolling", "rolling restart", "each gateway in turn: SIGTERM, start again, wait until ready, 5 s, next"),
    ("slow-consumer", "slow consumers", "20 devices that never read (4 KiB receive buffer) for 10 users that get 800 events/s each (a second load generator, the firehose), next to those users' normal devices and the main run's"),
    ("cluster-node-kill", "3-node RabbitMQ cluster, one node killed", "gateway i on node i (the others listed after it); node 2 of 3 SIGKILLed, started again 10 s later"),
]
LATE_MS = 1000  # a receipt later than this after its publish: the device was not served in time


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


env = dict(l.split("=", 1) for l in (text(os.path.join(run_dir, "machine.env")) or "").splitlines() if "=" in l)


def num(x):
    return "n/a" if x is None else f"{x:,}"


def served_again(report, meta):
    """Seconds from the fault's start to the end of the last second in
    which a device got an event late (> LATE_MS after its publish) or a
    device was not connected; 0 when no second after the fault was
    degraded. 1 s resolution (the series' seconds)."""
    if not report or not meta or not meta.get("fault_start_us"):
        return None
    start = report.get("series_start_unix_s")
    if start is None:
        return None
    fault = meta["fault_start_us"] / 1e6
    target = report["connections"]["target"]
    last = None
    # The run's last seconds, after the last delivery, are the stop (devices
    # closing), not the fault.
    series = report["series"]
    active = [p["t_s"] for p in series if p["deliveries_per_s"] > 0]
    for p in series:
        end = start + p["t_s"]  # a point covers the second that ends at its label
        if end <= fault or not active or p["t_s"] > active[-1]:
            continue
        late = (p.get("latency_max_ms") or 0) > LATE_MS
        if late or p["connections"] < target:
            last = end
    return 0.0 if last is None else round(last - fault, 1)


def warn_summary(path):
    """(count, up to 4 distinct messages without timestamps)."""
    lines = (text(path) or "").splitlines()
    seen = []
    for l in lines:
        m = re.sub(r"\x1b\[[0-9;]*m", "", l)
        m = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z\s*", "", m)
        m = re.sub(r"\s+", " ", m)[:160]
        key = re.sub(r"[0-9a-f]{6,}|\d+", "#", m)
        if all(key != k for k, _ in seen):
            seen.append((key, m))
    return len(lines), [m for _, m in seen[:4]]


runs = {}
for meta_path in sorted(glob.glob(os.path.join(run_dir, "*.meta.json"))):
    meta = load(meta_path)
    name = os.path.basename(meta_path)[: -len(".meta.json")]
    runs.setdefault(meta["case"], []).append((name, meta))

os.makedirs(results_dir, exist_ok=True)
for old in glob.glob(os.path.join(results_dir, "*.json")):
    os.remove(old)

notes = {}
raw_notes = text(os.path.join(here, "notes.md")) or ""
for part in re.split(r"^## ", raw_notes, flags=re.M)[1:]:
    head, _, body = part.partition("\n")
    notes[head.strip()] = body.strip()

lines = []
w = lines.append
w("# Reliability\n")
w("Produced by `scripts/faults.sh` (re-run it to refresh this file; `--quick` for a smoke run, `--only` for some cases).")
w("It builds release (or takes the binaries in `FAULTS_BIN`), starts its **own** RabbitMQ node (for the last case a 3-node cluster), Redis and PostgreSQL on other")
w("ports with their own data directories (the machine's shared services are never touched), 3 gateways and the backend,")
w("and runs each case under load with `loadtest run ... --recover` (the exact binary is in each Command line; devices that lose their connection")
w("reconnect with `?since=<newest id they have>`), fault injected a few seconds into the publishing. Loss is counted per")
w("(event, device) pair, never assumed (see `loadtest/README.md`); duplicates are allowed (at least once) and reported.")
w("Raw reports (without their per-second series) and metadata: [bench/reliability/](bench/reliability/).\n")
w("## Machine and load\n")
w("| | |\n|---|---|")
for k, label in [("cpu", "CPU"), ("cores", "cores"), ("mem_gib", "memory (GiB)"), ("kernel", "kernel"),
                 ("rabbitmq", "RabbitMQ"), ("redis", "Redis"), ("postgres", "PostgreSQL"), ("rustc", "rustc"),
                 ("commit", "commit"), ("date", "date (UTC)")]:
    if env.get(k):
        w(f"| {label} | {env[k]} |")
if env.get("users"):
    devices = int(env["users"]) * int(env["devices"])
    w(f"| load (gateway mode) | {env['users']} users x {env['devices']} devices = {devices:,} devices over 3 gateways, "
      f"{env['rate']} events/s x {env['fanout']} recipients = {int(env['rate']) * int(env['fanout']) * int(env['devices']):,} deliveries/s |")
    w(f"| load (end to end) | {env['e2e_users']} followers x {env['devices']} devices, {env['e2e_rate']} posts/s, "
      f"{env['e2e_fanout']} followers per author |")
    w(f"| runs per case | {env.get('runs')} |")
w("\nThe machine is shared (other builds and tests ran meanwhile): timings are noisy, read them as ranges.\n")
w("Columns: **expected** (event, device) pairs; **lost**: expected and never received; **dup**: received more than once;")
w(f"**served again**: from the fault's start to the end of the last second in which some device got an event more than")
w(f"{LATE_MS} ms late or some device was not connected (1 s resolution; 0: no such second); **back by itself**: all 3 gateways")
w("ready in a ring of 3 within 30 s of the run's end, with nothing done beyond undoing the fault; **WARN+**: log lines at WARN")
w("or above from the gateways and the backend during the run.\n")

summary = []
body = []
for case, title, how in CASES:
    if case not in runs:
        continue
    rows = []
    warn_text = []
    for name, meta in runs[case]:
        r = load(os.path.join(run_dir, name + ".json"))
        nw, samples = warn_summary(os.path.join(run_dir, name + ".warn"))
        slim = None
        if r:
            slim = {k: v for k, v in r.items() if k != "series"}
        json.dump({"meta": meta, "report": slim, "slow": load(os.path.join(run_dir, name + ".slow.json")),
                   "firehose": (lambda f: f and {k: v for k, v in f.items() if k != "series"})(
                       load(os.path.join(run_dir, name + ".firehose.json")))},
                  open(os.path.join(results_dir, name + ".json"), "w"), indent=1)
        fault_s = (meta["fault_end_us"] - meta["fault_start_us"]) / 1e6 if meta.get("fault_end_us") else None
        row = {"run": meta["run"], "r": r, "meta": meta, "warn": nw, "fault_s": fault_s,
               "served": served_again(r, meta), "cmd": text(os.path.join(run_dir, name + ".cmd")),
               "slow": load(os.path.join(run_dir, name + ".slow.json")),
               "fire": load(os.path.join(run_dir, name + ".firehose.json"))}
        rows.append(row)
        warn_text.append((meta["run"], samples))
    body.append(f"## {title} (`{case}`)\n")
    body.append(f"{how}.\n")
    body.append("| run | expected | lost | dup | fault lasted | served again | back by itself | WARN+ | publisher | close codes | exit |")
    body.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        r = x["r"]
        if not r:
            body.append(f"| {x['run']} | no report | | | | | {x['meta']['back_by_itself']} | {x['warn']} | | | {x['meta']['exit_code']} |")
            continue
        m = r["messages"]
        p = r.get("publisher", {})
        pub = f"{p.get('reconnects', 0)} reconnects, {p.get('republished', 0)} re-published, {p.get('given_up', 0)} given up"
        codes = ", ".join(f"{k}: {v}" for k, v in r.get("close_codes", {}).items()) or "none"
        fs = "n/a" if x["fault_s"] is None else f"{x['fault_s']:.1f} s"
        sv = "n/a" if x["served"] is None else f"{x['served']:.0f} s"
        body.append(f"| {x['run']} | {num(m['expected'])} | **{num(m['lost'])}** | {num(m['duplicates'])} | {fs} | {sv} | "
                    f"{'yes' if x['meta']['back_by_itself'] else 'no'} | {x['warn']} | {pub} | {codes} | {x['meta']['exit_code']} |")
    body.append("")
    for x in rows:
        r = x["r"]
        if r and r.get("e2e"):
            e = r["e2e"]["posts"]
            body.append(f"- run {x['run']}: {e['created']:,} posts created, {e['failed']:,} failed"
                        + (f" (first failure: `{e['first_error'][:140]}`)" if e.get("first_error") else "")
                        + "; a failed post is expected nowhere, every created one at every device of every follower.")
        if x["slow"] or x["fire"]:
            s, f = x["slow"] or {}, x["fire"] or {}
            fm = f.get("messages", {})
            body.append(f"- run {x['run']}: slow devices {s.get('devices', 'n/a')}, closed by their gateway "
                        f"{s.get('closed_by_server', 'n/a')}, **{s.get('close_codes', {}).get('4008', 0)} with 4008** "
                        f"(codes {s.get('close_codes', {})}), still open {s.get('still_open', 'n/a')}; "
                        f"the firehose's normal devices: expected {num(fm.get('expected'))}, lost **{num(fm.get('lost'))}**, "
                        f"dup {num(fm.get('duplicates'))}.")
        if x["meta"].get("note"):
            body.append(f"- run {x['run']}: {x['meta']['note']}.")
    for run, samples in warn_text:
        if samples:
            body.append(f"- run {run}, WARN+ lines (distinct, first few): " + "; ".join(f"`{s}`" for s in samples))
    if case in notes:
        body.append("\n" + notes[case])
    if rows and rows[0]["cmd"]:
        body.append(f"\nCommand (run 1): `{rows[0]['cmd']}`")
    body.append("")
    losts = [x["r"]["messages"]["lost"] if x["r"] else None for x in rows]
    summary.append((title, case, losts, [x["r"]["messages"]["duplicates"] if x["r"] else None for x in rows],
                    [x["served"] for x in rows], [x["meta"]["back_by_itself"] for x in rows]))

w("## Summary\n")
w("| case | lost (per run) | duplicates | served again (s) | back by itself |")
w("|---|---|---|---|---|")
for title, case, losts, dups, served, back in summary:
    fmt = lambda xs: " / ".join("n/a" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.0f}" for v in xs)
    w(f"| [{title}](#{re.sub(r'[^a-z0-9 -]', '', (title + ' ' + case).lower()).replace(' ', '-')}) | {fmt(losts)} | {fmt(dups)} | "
      f"{fmt(served)} | {' / '.join('yes' if b else 'no' for b in back)} |")
w("")
if "general" in notes:
    w(notes["general"] + "\n")
lines.extend(body)
with open(out, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")
