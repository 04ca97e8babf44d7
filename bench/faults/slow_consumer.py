#!/usr/bin/env python3
"""Slow consumers for scripts/faults.sh: WebSocket devices that connect and
then never read, with a tiny receive buffer, next to the load generator's
normal devices of the same users.

usage: slow_consumer.py --secret S --prefix P --users N [--per-user K]
                        --gateways "8284 8285 8286" --hold SECONDS

Each device asks a gateway for its user's owner (GET /v1/route), connects
there, upgrades, and reads nothing for --hold seconds. Then it drains what
its socket holds, looking for the server's close frame, and the JSON
printed on stdout says how many the gateways closed, with which codes, and
how many were still open (a slow consumer the gateway never closed is one
whose queue it kept growing)."""

import argparse, base64, hashlib, hmac, json, os, socket, sys, time, urllib.request


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(secret, sub):
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "iat": now, "exp": now + 3600}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def owner_port(gateway_port, tok):
    req = urllib.request.Request(f"http://127.0.0.1:{gateway_port}/v1/route", headers={"Authorization": f"Bearer {tok}"})
    url = json.load(urllib.request.urlopen(req, timeout=5))["url"]
    return int(url.rsplit(":", 1)[1].split("/")[0])


def connect(port, tok):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A tiny receive window: the gateway's writes back up at once.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /post/feed/posted HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {tok}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise RuntimeError("closed during the handshake")
        head += chunk
    status = head.split(b" ", 2)[1]
    if status != b"101":
        raise RuntimeError(f"handshake answered {status.decode()}")
    return s


def drain(s, wait):
    """Reads what the socket holds until EOF or `wait` seconds of silence;
    returns (closed by the server, close code or None, frames read)."""
    s.settimeout(wait)
    buf = b""
    frames = 0
    code = None
    eof = False
    while True:
        try:
            chunk = s.recv(65536)
        except (socket.timeout, TimeoutError):
            break
        except OSError:
            # Reset: the gateway gave up lingering, and what it had sent
            # (its close frame too) was thrown away with the connection.
            eof = True
            code = code if code is not None else "reset"
            break
        if not chunk:
            eof = True
            break
        buf += chunk
        # Parse whole frames off the front (server frames are unmasked).
        while len(buf) >= 2:
            op, ln = buf[0] & 0x0F, buf[1] & 0x7F
            at = 2
            if ln == 126:
                if len(buf) < 4:
                    break
                ln, at = int.from_bytes(buf[2:4], "big"), 4
            elif ln == 127:
                if len(buf) < 10:
                    break
                ln, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + ln:
                break
            payload = buf[at:at + ln]
            buf = buf[at + ln:]
            frames += 1
            if op == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
    return eof or code is not None, code, frames


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secret", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--users", type=int, required=True)
    ap.add_argument("--per-user", type=int, default=1)
    ap.add_argument("--gateways", required=True)
    ap.add_argument("--hold", type=float, required=True)
    ap.add_argument("--ready-file", help="written once every device is connected")
    a = ap.parse_args()
    ports = [int(p) for p in a.gateways.split()]
    socks, failed = [], []
    for u in range(a.users):
        tok = token(a.secret, f"{a.prefix}-{u}")
        for d in range(a.per_user):
            try:
                socks.append(connect(owner_port(ports[(u + d) % len(ports)], tok), tok))
            except Exception as e:
                failed.append(str(e))
    if a.ready_file:
        open(a.ready_file, "w").write(str(len(socks)))
    print(f"slow consumers: {len(socks)} connected, {len(failed)} failed; holding {a.hold}s", file=sys.stderr)
    time.sleep(a.hold)
    codes, closed, frames = {}, 0, 0
    for s in socks:
        c, code, n = drain(s, 2.0)
        closed += c
        frames += n
        if code is not None:
            codes[str(code)] = codes.get(str(code), 0) + 1
        s.close()
    json.dump({"devices": len(socks), "connect_failures": len(failed), "first_failure": failed[0] if failed else None,
               "closed_by_server": closed, "still_open": len(socks) - closed, "close_codes": codes,
               "frames_read_at_the_end": frames}, sys.stdout)


main()
