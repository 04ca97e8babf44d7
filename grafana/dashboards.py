#!/usr/bin/env python3
"""Writes grafana/dashboards/*.json: the Gateway, Backend and fan-out, Load test
and Broker dashboards.

One generator instead of four hand-edited JSON files, so every dashboard gets
the same things right: a target-health row (`up`) first, units on every
panel, thresholds on every stat, and one datasource. Run it after editing a
panel (`python3 grafana/dashboards.py`); scripts/check-compose.sh fails when
the committed JSON differs from what this prints (`--check`).
"""
import json
import sys
from pathlib import Path

DS = {"type": "prometheus", "uid": "prometheus"}
SCHEMA_VERSION = 39  # Grafana 11.x
OUT = Path(__file__).resolve().parent / "dashboards"

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"


def steps(*pairs):
    """Threshold steps: the base colour, then (value, colour) pairs."""
    base, *rest = pairs
    return {"mode": "absolute", "steps": [{"color": base, "value": None}] + [{"color": c, "value": v} for v, c in rest]}


class Board:
    def __init__(self, uid, title, description, variables=()):
        self.uid, self.title, self.description = uid, title, description
        self.variables = list(variables)
        self.panels, self.y, self.x, self.row_h = [], 0, 0, 0

    def _place(self, w, h):
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title):
        self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append({"type": "row", "title": title, "id": len(self.panels) + 1, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _targets(self, exprs, instant):
        out = []
        for i, (expr, legend) in enumerate(exprs):
            t = {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            if instant:
                t["instant"] = True
            out.append(t)
        return out

    def stat(self, title, exprs, unit, thresholds, description, w=4, h=5, mappings=None):
        self.panels.append({
            "type": "stat", "title": title, "id": len(self.panels) + 1, "datasource": DS,
            "description": description, "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": thresholds, "mappings": mappings or [],
                                         "color": {"mode": "thresholds"}}, "overrides": []},
            "targets": self._targets(exprs, instant=True),
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "none", "textMode": "auto",
                        "justifyMode": "auto", "orientation": "auto"},
        })

    def ts(self, title, exprs, unit, description, w=12, h=8, thresholds=None, stack=False):
        custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                  "spanNulls": False, "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
        defaults = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}}
        if thresholds:
            defaults["thresholds"] = thresholds
            custom["thresholdsStyle"] = {"mode": "line"}
        self.panels.append({
            "type": "timeseries", "title": title, "id": len(self.panels) + 1, "datasource": DS,
            "description": description, "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": self._targets(exprs, instant=False),
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
        })

    def health(self, jobs, description):
        """The first row of every dashboard: is each scraped target up?"""
        self.row("Target health")
        up = [{"type": "value", "options": {"0": {"text": "DOWN", "color": RED}, "1": {"text": "UP", "color": GREEN}}}]
        for job, sel, legend in jobs:
            self.stat(f"{job}: targets up", [(f"up{{{sel}}}", legend)], "none", steps(RED, (1, GREEN)),
                      description, w=24 // len(jobs), h=4, mappings=up)

    def json(self):
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": ["feedgate"],
            "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True, "graphTooltip": 1,
            "refresh": "5s", "time": {"from": "now-15m", "to": "now"}, "timezone": "",
            "templating": {"list": self.variables}, "annotations": {"list": []}, "links": [],
            "panels": self.panels,
        }


def node_variable(query):
    return {"name": "node", "label": "node", "type": "query", "datasource": DS,
            "query": {"query": query, "refId": "v"}, "definition": query, "includeAll": True, "multi": True,
            "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "refresh": 2, "sort": 1}


R = "$__rate_interval"
N = 'node=~"$node"'


def gateway():
    b = Board("feedgate-gateway", "Gateway", "Gateway nodes: devices, ring, delivery, memory.",
              [node_variable('label_values(up{job="gateway"}, node)')])
    b.health([("gateway", f'job="gateway", {N}', "{{node}}")],
             "1 while Prometheus can scrape the node. A dead or hung node shows DOWN here within one scrape.")
    b.row("Now")
    b.stat("Connections (all nodes)", [(f"sum(gateway_connections{{{N}}})", "devices")], "short",
           steps(BLUE), "WebSocket devices held, proxied ones included.")
    b.stat("Users (all nodes)", [(f"sum(gateway_users{{{N}}})", "users")], "short", steps(BLUE),
           "Distinct users with at least one device.")
    b.stat("Owned slots (1024 at rest)", [("sum(gateway_owned_slots)", "slots")], "none",
           steps(RED, (1024, GREEN), (1025, ORANGE)),
           "Red: some slots have no live owner (their events reach nobody live). Orange: slots owned twice.")
    b.stat("Ring members (each node's view)", [(f"gateway_ring_members{{{N}}}", "{{node}}")], "none",
           steps(ORANGE, (1, GREEN)), "How many members each node sees. They should all agree.")
    b.stat("Open files (highest node)", [(f'max(process_open_fds{{job="gateway", {N}}} / process_max_fds{{job="gateway", {N}}})', "open files")],
           "percentunit", steps(GREEN, (0.8, ORANGE), (0.9, RED)),
           "Each device is one file. Past the limit new connections fail.")
    b.stat("Broker reconnects (range)", [(f"sum(increase(gateway_broker_reconnects_total{{{N}}}[$__range]))", "reconnects")],
           "none", steps(GREEN, (1, ORANGE)), "RabbitMQ connections lost and re-made in the dashboard's range.")
    b.row("Connections")
    b.ts("Connections per node", [(f"gateway_connections{{{N}}}", "{{node}}")], "short", "Devices held per node.")
    b.ts("Connection attempts/s by result", [(f"sum by (result) (rate(gateway_connections_opened_total{{{N}}}[{R}]))", "{{result}}")],
         "reqps", "Every WebSocket attempt: ok, or why it was refused (auth, capacity, draining, device limit).")
    b.ts("Connections closed/s by reason", [(f"sum by (reason) (rate(gateway_connections_closed_total{{{N}}}[{R}]))", "{{reason}}")],
         "ops", "Closes the node decided: moved (4001), slow consumer (4008), frame too big (1009), ...")
    b.ts("Proxied connections", [(f"gateway_proxied_connections{{{N}}}", "{{node}}")], "short",
         "Devices this node relays to their owner (they entered through a non-owner).")
    b.ts("Proxy failures/s by result",
         [(f'sum by (result) (rate(gateway_connections_opened_total{{result=~"proxy_.*", {N}}}[{R}]))', "{{result}}")],
         "reqps", "Devices that entered a non-owner and could not be relayed: owner unreachable or slow (502/504), "
         "no ws:// address, or the owner's own refusal passed on. Alert: ProxyFailing.")
    b.stat("Devices closed by reason (range)",
           [(f"sum by (reason) (increase(gateway_connections_closed_total{{{N}}}[$__range]))", "{{reason}}")],
           "none", steps(GREEN, (1, ORANGE)),
           "Every way a device ended in the dashboard's range, one value per reason (0 included): after a node's "
           "death its devices reconnect elsewhere; recovery_failed (1011) and slow_consumer (4008) are the ones to watch.",
           w=12, h=6)
    b.stat("Refused connection attempts (range)",
           [(f'sum by (result) (increase(gateway_connections_opened_total{{result!="ok", {N}}}[$__range]))', "{{result}}")],
           "none", steps(GREEN, (1, ORANGE)),
           "Attempts that did not become a device, by why (auth, capacity, draining, device limit, ring changing, "
           "proxy failures). Alert: ConnectionAttemptsFailing.", w=12, h=6)
    b.row("Delivery")
    b.ts("Broker messages/s per node", [(f"sum by (node) (rate(gateway_broker_messages_total{{{N}}}[{R}]))", "{{node}}"),
                                        (f"sum(rate(gateway_broker_bad_messages_total{{{N}}}[{R}]))", "malformed")],
         "ops", "Messages consumed from each node's queue (one per event and owner node).")
    b.ts("Deliveries/s by result", [(f"sum by (result) (rate(gateway_deliveries_total{{{N}}}[{R}]))", "{{result}}")],
         "ops", "Frames handed to devices. dropped_slow counts frames lost with a device closed as slow (it recovers with since).")
    b.ts("Delivery latency p50 / p99 (publish to frame written)",
         [(f"histogram_quantile(0.5, sum by (le) (rate(gateway_delivery_latency_seconds_bucket{{{N}}}[{R}])))", "p50"),
          (f"histogram_quantile(0.99, sum by (le) (rate(gateway_delivery_latency_seconds_bucket{{{N}}}[{R}])))", "p99")],
         "s", "From the publisher's x-published-at to the frame written to the socket.",
         thresholds=steps(GREEN, (0.5, RED)))
    b.ts("Delivery latency p99 per node",
         [(f"histogram_quantile(0.99, sum by (node, le) (rate(gateway_delivery_latency_seconds_bucket{{{N}}}[{R}])))", "{{node}}")],
         "s", "One slow node stands out here.", thresholds=steps(GREEN, (0.5, RED)))
    b.ts("Recipients offline/s", [(f"sum by (node) (rate(gateway_recipients_offline_total{{{N}}}[{R}]))", "{{node}}")],
         "ops", "Recipients with no device on their owner node: normal for offline users.")
    b.ts("Stale-ring traffic and recovery/s",
         [(f"sum(rate(gateway_misrouted_recipients_total{{{N}}}[{R}]))", "misrouted recipients"),
          (f"sum(rate(gateway_republished_messages_total{{{N}}}[{R}]))", "re-published messages"),
          (f"sum(rate(gateway_recovered_events_total{{{N}}}[{R}]))", "events replayed (since)"),
          (f"sum(rate(gateway_departed_drained_messages_total{{{N}}}[{R}]))", "drained from departed queues")],
         "ops", "Traffic caused by ring changes: misrouted recipients re-published once, replays, departed-queue drains.")
    b.row("Ring")
    b.ts("Owned slots per node", [(f"gateway_owned_slots{{{N}}}", "{{node}}")], "none", "Slots each node binds.")
    b.ts("Rebalances", [(f"sum by (node) (increase(gateway_rebalances_total{{{N}}}[1m]))", "{{node}}")], "none",
         "Ring changes each node adopted, per minute.")
    b.row("Process")
    b.ts("RSS per connection (nodes above 1,000 devices)",
         [(f"(gateway_process_rss_bytes{{{N}}} / gateway_connections{{{N}}}) and gateway_connections{{{N}}} > 1000", "{{node}}")],
         "bytes", "Includes the process's base (~35 MB), so it overstates below ~20,000 devices. Empty on a node with few devices.")
    b.ts("Process RSS", [(f"gateway_process_rss_bytes{{{N}}}", "{{node}}")], "bytes", "Resident memory per node.")
    b.ts("jemalloc allocated / resident", [(f"gateway_heap_allocated_bytes{{{N}}}", "allocated {{node}}"),
                                           (f"gateway_heap_resident_bytes{{{N}}}", "resident {{node}}")],
         "bytes", "What the program holds vs what the allocator keeps resident.")
    b.ts("CPU", [(f'rate(process_cpu_seconds_total{{job="gateway", {N}}}[{R}])', "{{node}}")], "percentunit",
         "Cores used per node (1.0 = one core).")
    return b


def backend():
    b = Board("feedgate-backend", "Backend and fan-out", "The HTTP API, the fan-out, and the stores it uses.")
    b.health([("backend", 'job="backend"', "{{instance}}"), ("redis", 'job="redis"', "{{instance}}"),
              ("postgres", 'job="postgres"', "{{instance}}")],
             "1 while Prometheus can scrape the target (the exporters for Redis and PostgreSQL).")
    # The API's own traffic: Prometheus's scrapes and the health checks are left out.
    api = 'route!~"/metrics|/healthz|/readyz"'
    b.row("HTTP")
    b.stat("Requests/s (API)", [(f"sum(rate(backend_http_requests_total{{{api}}}[{R}]))", "req/s")], "reqps",
           steps(BLUE), "API requests, without /metrics and health checks.")
    b.stat("5xx ratio", [(f'(sum(rate(backend_http_requests_total{{{api}, status=~"5.."}}[{R}])) or vector(0)) / '
                          f"clamp_min(sum(rate(backend_http_requests_total{{{api}}}[{R}])), 1e-9)", "5xx")],
           "percentunit", steps(GREEN, (0.01, ORANGE), (0.05, RED)), "Share of API requests answered 5xx; 0 when healthy.")
    b.stat("Events published/s", [(f"sum(rate(backend_events_published_total[{R}])) or vector(0)", "events/s")], "ops",
           steps(BLUE), "Realtime broker messages (one per event and owner node).")
    b.stat("Fan-out retries (range)", [("sum(increase(backend_fanout_retries_total[$__range])) or vector(0)", "retries")],
           "none", steps(GREEN, (1, ORANGE), (100, RED)), "Fan-out jobs retried: each is retried until done, never dropped.")
    b.ts("Requests/s by route", [(f"sum by (method, route) (rate(backend_http_requests_total{{{api}}}[{R}]))", "{{method}} {{route}}")],
         "reqps", "API requests per route.")
    b.ts("Requests/s by status", [(f"sum by (status) (rate(backend_http_requests_total{{{api}}}[{R}]))", "{{status}}")],
         "reqps", "API requests per status.")
    b.ts("Request duration p50 / p99 (API)",
         [(f"histogram_quantile(0.5, sum by (le) (rate(backend_http_request_duration_seconds_bucket{{{api}}}[{R}])))", "p50"),
          (f"histogram_quantile(0.99, sum by (le) (rate(backend_http_request_duration_seconds_bucket{{{api}}}[{R}])))", "p99")],
         "s", "Time to answer, all API routes together.", thresholds=steps(GREEN, (1, RED)))
    b.ts("Request duration p99 by route",
         [(f"histogram_quantile(0.99, sum by (route, le) (rate(backend_http_request_duration_seconds_bucket{{{api}}}[{R}])))", "{{route}}")],
         "s", "A slow route stands out here.")
    b.row("Fan-out")
    b.stat("Outbox jobs waiting", [("sum(backend_outbox_jobs)", "jobs")], "none", steps(GREEN, (1000, ORANGE), (10000, RED)),
           "Fan-out jobs in the PostgreSQL outbox, not yet done (each post, update or deletion is one).", w=8)
    b.stat("Oldest outbox job", [("max(backend_outbox_oldest_job_age_seconds)", "age")], "s",
           steps(GREEN, (5, ORANGE), (30, RED)), "How far the fan-out lags behind the newest post it has to do.", w=8)
    b.stat("Failing outbox jobs", [("sum(backend_outbox_failing_jobs)", "jobs")], "none", steps(GREEN, (1, RED)),
           "Jobs that failed at least once and wait for their retry; the row's last_error says why.", w=8)
    b.ts("Fan-out lag and backlog", [("max(backend_outbox_oldest_job_age_seconds)", "oldest job age (s)"),
                                     ("sum(backend_outbox_jobs)", "jobs waiting")],
         "short", "The outbox over time: age of the oldest job waiting, and how many wait.")
    b.ts("Fan-out jobs/s and retries/s", [(f"sum(rate(backend_fanout_jobs_total[{R}]))", "jobs"),
                                          (f"sum(rate(backend_fanout_retries_total[{R}]))", "retries")],
         "ops", "One job per post, update or deletion.")
    b.ts("Fan-out recipients/s", [(f"sum(rate(backend_fanout_recipients_total[{R}]))", "recipients")], "ops",
         "Followers whose feed (and devices) a job reached.")
    b.ts("Fan-out lag p50 / p99 (post written to job done)",
         [(f"histogram_quantile({q}, sum by (le) (rate(backend_fanout_lag_seconds_bucket[{R}])))", name)
          for q, name in ((0.5, "p50"), (0.99, "p99"))],
         "s", "From a post's outbox row (written with the post) to its fan-out job done: every realtime event "
         "published and every feed written. Empty (NaN) while no job finishes.", thresholds=steps(GREEN, (5, RED)))
    b.ts("Fan-out parts p99 (realtime vs feeds)",
         [(f"histogram_quantile(0.99, sum by (part, le) (rate(backend_fanout_part_seconds_bucket[{R}])))", "{{part}}")],
         "s", "From a create job's start to the end of each part, run at once: realtime (events published) should end "
         "well before feeds (follower feeds written) on a large audience.")
    b.ts("Events published/s (broker messages)", [(f"sum(rate(backend_events_published_total[{R}]))", "events")], "ops",
         "Broker messages published with confirms.")
    b.row("Stores")
    b.ts("Redis memory", [("redis_memory_used_bytes", "used"), ("redis_memory_max_bytes", "max")], "bytes",
         "The feed caches and the membership live here.")
    b.ts("Redis commands/s and clients", [(f"rate(redis_commands_processed_total[{R}])", "commands/s"),
                                          ("redis_connected_clients", "clients")], "short", "Load on Redis.")
    b.ts("PostgreSQL connections", [("sum by (datname) (pg_stat_database_numbackends)", "{{datname}}")], "short",
         "Backends per database (the pool's connections among them).")
    b.ts("PostgreSQL transactions/s", [(f"sum by (datname) (rate(pg_stat_database_xact_commit[{R}]))", "commit {{datname}}"),
                                       (f"sum by (datname) (rate(pg_stat_database_xact_rollback[{R}]))", "rollback {{datname}}")],
         "ops", "Commits and rollbacks.")
    return b


def loadtest():
    b = Board("feedgate-loadtest", "Load test", "The load generator while a run is going (it serves /metrics on 9464).")
    b.health([("loadtest", 'job="loadtest"', "{{instance}}")], "DOWN between runs: the load generator only runs on demand.")
    b.row("Run")
    b.stat("Connections", [("sum(loadtest_connections)", "devices")], "short", steps(BLUE), "Devices the run holds open.")
    b.stat("Messages received/s", [(f"sum(rate(loadtest_messages_received_total[{R}]))", "msg/s")], "ops", steps(BLUE),
           "Frames the devices received.")
    b.stat("Latency p99", [(f"histogram_quantile(0.99, sum by (le) (rate(loadtest_latency_seconds_bucket[{R}])))", "p99")],
           "s", steps(GREEN, (0.05, ORANGE), (0.5, RED)), "Publish to receipt, measured by the devices.")
    b.ts("Connections", [("sum(loadtest_connections)", "devices")], "short", "Devices held.", w=8)
    b.ts("Messages received/s", [(f"sum(rate(loadtest_messages_received_total[{R}]))", "received")], "ops",
         "Frames received per second.", w=8)
    b.ts("Latency p50 / p99 / p99.9",
         [(f"histogram_quantile({q}, sum by (le) (rate(loadtest_latency_seconds_bucket[{R}])))", name)
          for q, name in ((0.5, "p50"), (0.99, "p99"), (0.999, "p99.9"))],
         "s", "Quantiles from histogram buckets: read them as 'below the bucket bound'. The run's report has the exact figures.",
         w=8)
    return b


def broker():
    b = Board("feedgate-broker", "Broker", "RabbitMQ, from its own rabbitmq_prometheus plugin.")
    b.health([("rabbitmq", 'job=~"rabbitmq.*"', "{{job}} {{instance}}")], "1 while the broker's metrics endpoint answers.")
    q = "rabbitmq_detailed_queue_messages"
    b.row("Queues")
    b.stat("feed.unroutable", [(f'sum({q}{{queue="feed.unroutable"}}) or vector(0)', "events")], "none",
           steps(GREEN, (1, RED)), "Events published for slots no gateway bound. Any at all is a window without an owner.")
    b.stat("Gateway queues backlog", [(f'sum({q}{{queue=~"gateway\\\\..*"}}) or vector(0)', "messages")], "none",
           steps(GREEN, (1000, ORANGE), (10000, RED)), "Messages waiting in all gateway queues.")
    b.stat("Other queues backlog", [(f'sum({q}{{queue!~"gateway\\\\..*|feed.unroutable"}}) or vector(0)', "messages")],
           "none", steps(GREEN, (1000, ORANGE), (10000, RED)), "Anything else waiting in the broker.")
    b.stat("Connections", [("sum(rabbitmq_connections)", "connections")], "short", steps(BLUE), "Client connections.")
    b.ts("Depth per gateway queue", [(f'{q}{{queue=~"gateway\\\\..*"}}', "{{queue}}")], "short",
         "A growing queue is a node that does not keep up, or a dead node's queue before it is drained.")
    b.ts("Depth of the other queues", [(f'{q}{{queue!~"gateway\\\\..*"}}', "{{queue}}")], "short",
         "feed.unroutable and any other queue (fan-out jobs live in the backend's PostgreSQL outbox, not here).")
    b.row("Rates")
    b.ts("Messages/s", [(f"sum(rate(rabbitmq_global_messages_received_total[{R}]))", "published"),
                        (f"sum(rate(rabbitmq_global_messages_delivered_total[{R}]))", "delivered"),
                        (f"sum(rate(rabbitmq_global_messages_confirmed_total[{R}]))", "confirmed")],
         "ops", "Node-wide publish, deliver and confirm rates.")
    b.ts("Unroutable and returned/s", [(f"sum(rate(rabbitmq_global_messages_unroutable_dropped_total[{R}]))", "dropped"),
                                       (f"sum(rate(rabbitmq_global_messages_unroutable_returned_total[{R}]))", "returned")],
         "ops", "Should stay at 0: unroutable events go to the alternate exchange instead.")
    return b


BOARDS = {"gateway.json": gateway, "backend.json": backend, "loadtest.json": loadtest, "broker.json": broker}


def render():
    return {name: json.dumps(make().json(), indent=1) + "\n" for name, make in BOARDS.items()}


if __name__ == "__main__":
    out = render()
    if sys.argv[1:] == ["--check"]:
        stale = [n for n, text in out.items() if not (OUT / n).exists() or (OUT / n).read_text() != text]
        extra = sorted(p.name for p in OUT.glob("*.json") if p.name not in out)
        if stale or extra:
            print(f"grafana/dashboards differ from grafana/dashboards.py: {stale + extra}; run python3 grafana/dashboards.py",
                  file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    for name, text in out.items():
        (OUT / name).write_text(text)
    print(f"wrote {', '.join(sorted(out))} to {OUT}")
