"""The deathstar's HTTP API (Cilium's starwars image) and a client, run inside pods by tests.

serve PORT                         answer like the deathstar: POST /v1/request-landing ->
                                   "Ship landed", PUT /v1/exhaust-port -> 503 "Panic: deathstar
                                   exploded", anything else 404; prints "ready" once listening
request TIMEOUT IP PORT METHOD PATH...   one keep-alive connection; each METHOD PATH pair is one
                                   request on it; prints one JSON line per request:
                                   {"status": int, "body": str} or {"error": name}
session IP PORT                    one keep-alive connection; for each stdin line "METHOD PATH"
                                   one request, one JSON line as above, until EOF
$STARWARS_MARK (request): the client socket's SO_MARK, as a pod forging the proxy's mark would
hammer SECONDS IP PORT METHOD PATH   a new connection per request for SECONDS; prints "first"
                                   after the first answer, then the count of each outcome as
                                   JSON: {"200": n, "403": n, "error": n}
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import sys
import time

ANSWERS = {
    ("POST", "/v1/request-landing"): (200, "Ship landed\n"),
    ("PUT", "/v1/exhaust-port"): (503, "Panic: deathstar exploded\n"),
    ("GET", "/v1"): (200, '{"name": "Death Star", "class": "Deep Space Mobile Battlestation"}\n'),
}


class Deathstar(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, body = ANSWERS.get((self.command, self.path), (404, "Not found\n"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(port: int) -> None:
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Deathstar)
    print("ready", flush=True)
    server.serve_forever()


def one(conn: http.client.HTTPConnection, method: str, path: str) -> dict[str, object]:
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        response = conn.getresponse()
        return {"status": response.status, "body": response.read().decode(errors="replace")}
    except (OSError, http.client.HTTPException) as e:
        conn.close()  # the next request opens a new connection
        return {"error": type(e).__name__}


def main() -> None:
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]))
    elif mode == "request":
        timeout, ip, port, rest = float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5:]
        conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        if mark := os.environ.get("STARWARS_MARK"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(mark, 0))
            sock.settimeout(timeout)
            sock.connect((ip, port))
            conn.sock = sock
        for method, path in zip(rest[::2], rest[1::2], strict=True):
            print(json.dumps(one(conn, method, path)), flush=True)
    elif mode == "session":
        conn = http.client.HTTPConnection(sys.argv[2], int(sys.argv[3]), timeout=5)
        print("ready", flush=True)
        for line in sys.stdin:
            method, path = line.split()
            print(json.dumps(one(conn, method, path)), flush=True)
    elif mode == "hammer":
        seconds, ip, port, method, path = sys.argv[2:7]
        outcomes: dict[str, int] = {}
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection(ip, int(port), timeout=0.5)
            answer = one(conn, method, path)
            conn.close()
            key = str(answer.get("status", "error"))
            if not outcomes and key != "error":
                print("first", flush=True)
            outcomes[key] = outcomes.get(key, 0) + 1
        print(json.dumps(outcomes), flush=True)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
