"""The "outside world" of the DNS tests, and the client the pods run (dnspython).

serve ZONE DNS_IP HTTP_IP...   in the outside namespace: DNS on DNS_IP:53 (UDP and TCP) answering
                               A queries from ZONE, a JSON file {name: {"ips": [...], "ttl": N}}
                               read again whenever it changes (a name "*.x" answers any one label
                               in front of x; {"prefix": "a.b.c.", "ttl": N} answers a.b.c.L
                               for the label L); NXDOMAIN otherwise. HTTP on port 80 of every
                               HTTP_IP, answering with that address. Prints "ready".
query SERVER[:PORT] NAME [tcp] one query (port 53 by default); prints {"rcode", "answers",
                               "ttl"} or {"error"}
fetch SERVER NAME [IP]         resolve NAME, then at once GET / from the first address; prints
                               {"rcode", "answers", "http": body or the error's name}, and
                               with IP "also": GET / from IP after that
until-dropped IP SECONDS       GET / from IP until a new connection fails (at most SECONDS),
                               holding one HTTP/1.1 connection opened first; prints {"after":
                               seconds or null, "held": the held connection's answer after it}
first-connect SERVER NAME...   for each NAME: resolve it, then at once connect to the answer's
                               port 80 (a refusal counts as reached: the SYN got there); prints
                               {"reached": N, "dropped": [NAME...], "failed": [NAME...]}
get IP [PORT]                  GET / from IP; prints the body or the error's name (exit 1)
garbage SERVER                 send a datagram that is no DNS message to SERVER:53; prints
                               "answered" or "silent"
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset


class Zone:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.mtime = 0.0
        self.records: dict[str, dict[str, object]] = {}

    def lookup(self, name: str) -> dict[str, object] | None:
        mtime = os.stat(self.path).st_mtime
        if mtime != self.mtime:
            self.records = json.loads(self.path.read_text())
            self.mtime = mtime
        name = name.lower().rstrip(".")
        found = self.records.get(name)
        if found is None and "." in name:
            found = self.records.get("*." + name.split(".", 1)[1])
        return found

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        found = self.lookup(question.name.to_text())
        if found is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            if "prefix" in found:
                ips = [f"{found['prefix']}{question.name.labels[0].decode()}"]
            else:
                ips = [str(ip) for ip in found["ips"]]  # type: ignore[attr-defined]
            ttl = int(found["ttl"])  # type: ignore[call-overload]
            response.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", "A", ips))
        return response.to_wire()


class Udp(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            answer = self.zone.answer(data)
        except Exception:
            return
        assert self.transport is not None
        self.transport.sendto(answer, addr)


async def serve(zone_path: str, dns_ip: str, http_ips: list[str]) -> None:
    zone = Zone(Path(zone_path))
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: Udp(zone), local_addr=(dns_ip, 53))

    async def tcp_dns(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                answer = zone.answer(await reader.readexactly(size))
                writer.write(len(answer).to_bytes(2, "big") + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            writer.close()

    await asyncio.start_server(tcp_dns, dns_ip, 53)
    for ip in http_ips:

        async def http(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str = ip
        ) -> None:
            try:
                while True:  # HTTP/1.1 keeps the connection open, HTTP/1.0 closes it
                    request = await reader.readuntil(b"\r\n\r\n")
                    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(ip)
                    writer.write(head + ip.encode())
                    await writer.drain()
                    if b"HTTP/1.0" in request.split(b"\r\n", 1)[0]:
                        break
            except (asyncio.IncompleteReadError, OSError, asyncio.LimitOverrunError):
                pass
            writer.close()

        await asyncio.start_server(http, ip, 80)
    print("ready", flush=True)
    await asyncio.Event().wait()


def query(server: str, name: str, tcp: bool = False) -> dict[str, object]:
    message = dns.message.make_query(name, "A")
    host, _, port = server.partition(":")
    try:
        if tcp:
            answer = dns.query.tcp(message, host, timeout=2, port=int(port or 53))
        else:
            answer = dns.query.udp(message, host, timeout=2, port=int(port or 53))
    except Exception as exc:
        return {"error": type(exc).__name__}
    addresses = [rd.address for rrset in answer.answer for rd in rrset if rrset.rdtype == 1]
    ttls = [rrset.ttl for rrset in answer.answer]
    return {
        "rcode": dns.rcode.to_text(answer.rcode()),
        "answers": addresses,
        "ttl": min(ttls) if ttls else 0,
    }


def first_connect(server: str, names: list[str]) -> dict[str, object]:
    reached, dropped, failed = 0, [], []
    for name in names:
        answers = query(server, name).get("answers") or []
        if not answers:
            failed.append(name)
            continue
        try:
            socket.create_connection((str(answers[0]), 80), timeout=1.0).close()  # type: ignore[index]
            reached += 1
        except ConnectionRefusedError:
            reached += 1  # the world answered the SYN: it was not dropped
        except OSError:
            dropped.append(name)
    return {"reached": reached, "dropped": dropped, "failed": failed}


def get(ip: str, port: int = 80) -> str:
    try:
        with socket.create_connection((ip, port), timeout=1.5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nhost: x\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[-1].decode()
    except OSError as exc:
        return type(exc).__name__


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "serve":
        asyncio.run(serve(args[0], args[1], args[2:]))
    elif command == "query":
        print(json.dumps(query(args[0], args[1], tcp=args[2:] == ["tcp"])))
    elif command == "fetch":
        found = query(args[0], args[1])
        answers = found.get("answers") or []
        found["http"] = get(str(answers[0])) if answers else "no address"  # type: ignore[index]
        if len(args) > 2:
            found["also"] = get(args[2])
        print(json.dumps(found))
    elif command == "until-dropped":
        held = socket.create_connection((args[0], 80), timeout=3)
        ask = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
        held.sendall(ask)
        held.recv(4096)
        started = time.monotonic()
        after: float | None = None
        while after is None and time.monotonic() - started < float(args[1]):
            if get(args[0]) != args[0]:
                after = round(time.monotonic() - started, 1)
            time.sleep(0.1)
        try:
            held.sendall(ask)
            answer = held.recv(4096).split(b"\r\n\r\n", 1)[-1].decode()
        except OSError as exc:
            answer = type(exc).__name__
        print(json.dumps({"after": after, "held": answer}))
    elif command == "first-connect":
        print(json.dumps(first_connect(args[0], args[1:])))
    elif command == "get":
        body = get(args[0], int(args[1]) if len(args) > 1 else 80)
        print(body)
        return 0 if body == args[0] else 1
    elif command == "garbage":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.5)
            sock.sendto(b"\x00\x01not a dns message", (args[0], 53))
            try:
                sock.recv(4096)
                print("answered")
            except OSError:
                print("silent")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
