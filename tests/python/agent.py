#!/usr/bin/env python3
"""A second, independent agent of mesh-operator's link protocol (version 2), written from
docs/agent-integration.md alone: pycrdt for the document, cryptography for the Ed25519 key and its
certificate, pyOpenSSL for TLS (Python's ssl module cannot accept an unknown self-signed client certificate
as a server), wsproto for WebSocket framing. It links to the pinned rendezvous, dials the peers of its
downward-API assignment file and admits exactly its `accepts`, under its cap.

It serves the same test API as mesh-agent (GET /status, GET and POST /updates) on --test-api, and /healthz
alone on --metrics (it has no metrics), and prints `listening mesh=ADDR metrics=ADDR test-api=ADDR node=ID`
once it accepts links. Run by tests/e2e_python.rs.
"""
import argparse
import asyncio
import hashlib
import hmac
import json
import os
import random
import time
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from pycrdt import Doc, Map, create_sync_message, create_update_message, handle_sync_message
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping, RejectConnection,
                            Request, TextMessage)

ALPN = b"agentmesh/2"
EXPORTER_LABEL = b"EXPORTER-agentmesh-join-token"
WELCOME = '{"type":"welcome"}'
HEARTBEAT = '{"type":"heartbeat"}'
REASONS = {4001: "unauthenticated", 4002: "malformed", 4003: "not_planned", 4008: "slow", 4009: "duplicate",
           4010: "unplanned", 4018: "itself", 4029: "at_cap"}
CODE = {reason: code for code, reason in REASONS.items()}
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class Identity:
    """The Ed25519 node key (32 raw secret bytes in a file) and a self-signed certificate of it."""

    def __init__(self, path):
        if os.path.exists(path):
            with open(path, "rb") as f:
                secret = f.read()
        else:
            secret = os.urandom(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, secret)
            os.close(fd)
        self.key = Ed25519PrivateKey.from_private_bytes(secret)
        self.node_id = self.key.public_key().public_bytes(*RAW).hex()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.node_id)])
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(datetime(1975, 1, 1, tzinfo=timezone.utc))
                     .not_valid_after(datetime(4096, 1, 1, tzinfo=timezone.utc))
                     .sign(self.key, None))


def node_id_of(cert):
    key = cert.to_cryptography().public_key()
    return key.public_bytes(*RAW).hex() if isinstance(key, Ed25519PublicKey) else None


def tls_context(identity, server, expect=None):
    """TLS 1.3 only, our certificate, and the peer's: any Ed25519 node (acceptor) or exactly `expect`."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(crypto.X509.from_cryptography(identity.cert))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(identity.key))

    def verify(_conn, cert, _errno, depth, _ok):
        got = node_id_of(cert)
        return depth == 0 and got is not None and (expect is None or got == expect)

    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    if server:
        ctx.set_alpn_select_callback(lambda _c, offered: ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS)
    else:
        ctx.set_alpn_protos([ALPN])
    return ctx


def token_proof(conn, token):
    exported = conn.export_keying_material(EXPORTER_LABEL, 32)
    return hmac.new(token.encode(), exported, hashlib.sha256).hexdigest()


class Tls:
    """TLS over an asyncio stream through pyOpenSSL's memory BIO."""

    def __init__(self, reader, writer, conn):
        self.reader, self.writer, self.conn = reader, writer, conn

    async def flush(self):
        while True:
            try:
                out = self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            self.writer.write(out)
        await self.writer.drain()

    async def feed(self):
        data = await self.reader.read(65536)
        if not data:
            raise ConnectionError("closed")
        self.conn.bio_write(data)

    async def handshake(self):
        while True:
            try:
                self.conn.do_handshake()
                return await self.flush()
            except SSL.WantReadError:
                await self.flush()
                await self.feed()

    async def send(self, data):
        self.conn.sendall(data)
        await self.flush()

    async def recv(self):
        while True:
            try:
                data = self.conn.recv(65536)
                await self.flush()
                return data
            except SSL.WantReadError:
                await self.flush()
                await self.feed()
            except SSL.ZeroReturnError:
                return b""

    def close(self):
        self.writer.close()


class Socket:
    """A WebSocket (wsproto) over a TLS stream: whole messages in, events out."""

    def __init__(self, tls, role):
        self.tls, self.ws, self.pending, self.parts = tls, WSConnection(role), [], []

    async def send(self, event):
        await self.tls.send(self.ws.send(event))

    async def event(self):
        while not self.pending:
            for ev in self.ws.events():
                if isinstance(ev, Message):
                    self.parts.append(ev.data)
                    if ev.message_finished:
                        joined = "".join(self.parts) if isinstance(ev, TextMessage) else b"".join(self.parts)
                        self.pending.append(type(ev)(data=joined))
                        self.parts = []
                elif isinstance(ev, Ping):
                    await self.send(ev.response())
                else:
                    self.pending.append(ev)
            if not self.pending:
                data = await self.tls.recv()
                self.ws.receive_data(data or None)
                if not data and not self.pending:
                    return None
        return self.pending.pop(0)


async def connect(url, identity, expect, headers):
    """Dials `url` (wss://host:port/path): TLS that completes only with `expect`, then the upgrade."""
    assert url.startswith("wss://"), url
    hostport, _, path = url[len("wss://"):].partition("/")
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 5)
    conn = SSL.Connection(tls_context(identity, False, expect), None)
    conn.set_connect_state()
    tls = Tls(reader, writer, conn)
    try:
        await asyncio.wait_for(tls.handshake(), 5)
        return await upgrade_as_dialer(tls, hostport, "/" + path, headers)
    except BaseException:
        tls.close()
        raise


async def upgrade_as_dialer(tls, host, target, headers):
    sock = Socket(tls, ConnectionType.CLIENT)
    extra = [(k.encode(), v(tls.conn).encode() if callable(v) else v.encode()) for k, v in headers.items()]
    await sock.send(Request(host=host, target=target, extra_headers=extra))
    answer = await asyncio.wait_for(sock.event(), 10)
    if isinstance(answer, RejectConnection) or not isinstance(answer, AcceptConnection):
        raise ConnectionError(f"upgrade refused: {answer}")
    answer = await asyncio.wait_for(sock.event(), 10)
    if isinstance(answer, TextMessage) and answer.data == WELCOME:
        return sock
    if isinstance(answer, CloseConnection):
        raise Refused(REASONS.get(answer.code, str(answer.code)))
    raise ConnectionError(f"expected the welcome, got {answer}")


class Refused(Exception):
    pass


class Agent:
    def __init__(self, args):
        self.args = args
        self.identity = Identity(args.identity)
        self.doc = Doc()
        self.doc["updates"] = self.updates = Map()
        self.links = {}  # (node id, "dialed"|"accepted") -> Socket
        self.dialing = set()
        self.assignment = None
        self.seen = set()
        self.first_seen = {}
        self.refused = {}  # why our dials were refused
        self.written = 0

    # The document: sync messages in, updates forwarded once to every other link.
    async def serve_link(self, key, sock):
        self.links[key] = sock
        beat = asyncio.create_task(self.heartbeat(sock))
        try:
            await sock.send(BytesMessage(data=create_sync_message(self.doc)))
            while True:
                ev = await asyncio.wait_for(sock.event(), 20)
                if ev is None or isinstance(ev, CloseConnection):
                    break
                if isinstance(ev, BytesMessage) and not await self.incoming(key, sock, bytes(ev.data)):
                    await sock.send(CloseConnection(code=CODE["malformed"]))
                    break
        except (asyncio.TimeoutError, ConnectionError, OSError, SSL.Error):
            pass
        finally:
            beat.cancel()
            if self.links.get(key) is sock:
                del self.links[key]
            sock.tls.close()

    async def incoming(self, key, sock, message):
        if len(message) < 2 or message[0] != 0 or message[1] > 2:
            return False  # only sync messages are spoken
        if message[1] == 0:
            reply = handle_sync_message(message[1:], self.doc)
            await sock.send(BytesMessage(data=reply))
            return True
        digest = hashlib.sha256(message[2:]).digest()
        if digest in self.seen:
            return True
        self.seen.add(digest)
        before = set(self.updates.keys())
        handle_sync_message(message[1:], self.doc)
        now = time.time() * 1000
        for k in set(self.updates.keys()) - before:
            self.first_seen.setdefault(k, now)
        forward = create_update_message(read_buf(message[2:]))
        await self.broadcast(forward, skip=key)
        return True

    async def broadcast(self, message, skip=None):
        for key, sock in list(self.links.items()):
            if key != skip:
                try:
                    await sock.send(BytesMessage(data=message))
                except (ConnectionError, OSError, SSL.Error):
                    pass

    async def heartbeat(self, sock):
        while True:
            await asyncio.sleep(1)
            await sock.send(TextMessage(data=HEARTBEAT))

    async def append(self, value):
        key = f"{self.identity.node_id[:12]}-py-{self.written}"
        self.written += 1
        state = self.doc.get_state()
        entry = {"origin": self.identity.node_id, "writtenAtMs": time.time() * 1000, "value": value}
        self.updates[key] = json.dumps(entry)
        self.first_seen[key] = time.time() * 1000
        update = self.doc.get_update(state)
        self.seen.add(hashlib.sha256(write_buf(update)).digest())
        await self.broadcast(create_update_message(update))
        return key

    # The links the assignment wants: close what it no longer holds, then dial, under the cap.
    def count(self):
        return len(self.links) + len(self.dialing)

    async def follow(self):
        while True:
            assignment = read_assignment(self.args.assignment_file)
            if assignment is not None and assignment != self.assignment:
                self.assignment = assignment
                for (peer, direction), sock in list(self.links.items()):
                    held = assignment["peers"] if direction == "dialed" else assignment["accepts"]
                    if peer not in held and (peer, direction) != ("rendezvous", "dialed"):
                        await sock.send(CloseConnection(code=CODE["unplanned"]))
                        sock.tls.close()
                        self.links.pop((peer, direction), None)
            for peer, url in (self.assignment or {}).get("peers", {}).items():
                if (peer, "dialed") not in self.links and peer not in self.dialing and self.count() < self.cap():
                    self.dialing.add(peer)
                    asyncio.create_task(self.dial(peer, url))
            await asyncio.sleep(0.1)

    def cap(self):
        # The lower of our own cap and the assignment's; the rendezvous link is not a mesh link.
        planned = (self.assignment or {}).get("max_peers")
        cap = self.args.max_peers if planned is None else min(planned, self.args.max_peers)
        return cap + (1 if ("rendezvous", "dialed") in self.links else 0)

    async def dial(self, peer, url):
        try:
            sock = await connect(url, self.identity, peer, {})
        except Refused as why:
            self.refused[str(why)] = self.refused.get(str(why), 0) + 1
            return await self.backoff(peer)
        except (asyncio.TimeoutError, ConnectionError, OSError, SSL.Error):
            return await self.backoff(peer)
        self.dialing.discard(peer)
        await self.serve_link((peer, "dialed"), sock)

    async def backoff(self, peer):
        await asyncio.sleep(random.uniform(0.1, 0.5))
        self.dialing.discard(peer)

    async def accept(self, reader, writer):
        conn = SSL.Connection(tls_context(self.identity, True), None)
        conn.set_accept_state()
        tls = Tls(reader, writer, conn)
        peer, sock = None, None
        try:
            await asyncio.wait_for(tls.handshake(), 5)
            peer = node_id_of(conn.get_peer_certificate())
            sock = Socket(tls, ConnectionType.SERVER)
            request = await asyncio.wait_for(sock.event(), 5)
            if not isinstance(request, Request):
                return tls.close()
            why = self.admit(peer)
            if why:
                await sock.send(AcceptConnection())
                await sock.send(CloseConnection(code=CODE[why]))
                return tls.close()
            # The slot is taken before anything is awaited, so two dialers cannot both pass the cap.
            self.links[(peer, "accepted")] = sock
            await sock.send(AcceptConnection())
            await sock.send(TextMessage(data=WELCOME))
        except (asyncio.TimeoutError, ConnectionError, OSError, SSL.Error):
            if self.links.get((peer, "accepted")) is sock:
                del self.links[(peer, "accepted")]
            return tls.close()
        await self.serve_link((peer, "accepted"), sock)

    def admit(self, peer):
        if peer == self.identity.node_id:
            return "itself"
        if self.assignment is None or peer not in self.assignment["accepts"]:
            return "not_planned"
        if any(p == peer for p, _ in self.links) or peer in self.dialing:
            return "duplicate"
        if self.count() >= self.cap():
            return "at_cap"
        return None

    async def rendezvous(self, advertise):
        headers = {"agentmesh-address": advertise, "agentmesh-hostname": self.args.hostname}
        if self.args.join_token:
            headers["agentmesh-token-proof"] = lambda conn: token_proof(conn, self.args.join_token)
        while True:
            try:
                sock = await connect(self.args.rendezvous, self.identity, self.args.rendezvous_node_id, headers)
                await self.serve_link(("rendezvous", "dialed"), sock)
            except (Refused, asyncio.TimeoutError, ConnectionError, OSError, SSL.Error):
                pass
            await asyncio.sleep(0.5)

    # The test API, as mesh-agent serves it.
    async def api(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target = head.split(b" ")[:2]
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = json.loads(await reader.readexactly(length) or b"{}")
            reply = await self.route(method.decode(), target.decode(), body)
            data = json.dumps(reply).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def route(self, method, target, body):
        if target == "/status":
            links = [{"nodeId": p, "direction": d} for p, d in self.links if p != "rendezvous"]
            return {"nodeId": self.identity.node_id, "links": links, "refused": self.refused,
                    "rendezvousConnected": ("rendezvous", "dialed") in self.links}
        if target == "/updates" and method == "POST":
            return {"key": await self.append(body.get("value", ""))}
        if target == "/updates":
            out = []
            for k in sorted(self.updates.keys()):
                w = json.loads(str(self.updates[k]))
                out.append({"key": k, "origin": w.get("origin"), "value": w.get("value"),
                            "writtenAtMs": w.get("writtenAtMs"), "firstSeenMs": self.first_seen.get(k)})
            return out
        return {"error": f"no route {method} {target}"}


def read_var(b, at):
    value, shift = 0, 0
    while True:
        byte = b[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def read_buf(b):
    n, at = read_var(b, 0)
    return bytes(b[at:at + n])


def write_buf(b):
    n, out = len(b), bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + b


def unquote(value):
    """A value quoted as Go's strconv.Quote writes it."""
    out, i, raw = bytearray(), 0, value.encode()
    simple = {ord("n"): b"\n", ord("t"): b"\t", ord("r"): b"\r", ord('"'): b'"', ord("\\"): b"\\",
              ord("a"): b"\a", ord("b"): b"\b", ord("f"): b"\f", ord("v"): b"\v", ord("'"): b"'"}
    while i < len(raw):
        c = raw[i]
        if c != ord("\\"):
            out.append(c)
            i += 1
            continue
        e = raw[i + 1]
        if e in simple:
            out += simple[e]
            i += 2
        elif e == ord("x"):
            out.append(int(raw[i + 2:i + 4], 16))
            i += 4
        elif e in (ord("u"), ord("U")):
            width = 4 if e == ord("u") else 8
            out += chr(int(raw[i + 2:i + 2 + width], 16)).encode()
            i += 2 + width
        else:
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
    return out.decode()


def read_assignment(path):
    """The downward-API file's assignment: None while the file is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        annotations = {}
        for line in lines:
            key, _, quoted = line.partition("=")
            if not (quoted.startswith('"') and quoted.endswith('"') and len(quoted) >= 2):
                return None
            annotations[key] = unquote(quoted[1:-1])
        if "agentmesh.dev/peers" not in annotations:
            return {"peers": {}, "accepts": set(), "max_peers": None}
        peers = {p["nodeId"]: p["url"] for p in json.loads(annotations["agentmesh.dev/peers"])}
        accepts = set(json.loads(annotations["agentmesh.dev/accepts"]))
        max_peers = annotations.get("agentmesh.dev/max-peers")
        if max_peers is not None and not (max_peers.isdigit() and len(peers) + len(accepts) <= int(max_peers) <= 64):
            return None
        return {"peers": peers, "accepts": accepts, "max_peers": None if max_peers is None else int(max_peers)}
    except (OSError, ValueError, KeyError, IndexError):
        return None


async def health(reader, writer):
    """The metrics port: /healthz, and nothing else (this agent has no metrics)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        found = head.split(b" ")[:2] == [b"GET", b"/healthz"]
        status, body = (b"200 OK", b"ok") if found else (b"404 Not Found", b"")
        writer.write(b"HTTP/1.1 " + status + b"\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--test-api", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--rendezvous", required=True)
    p.add_argument("--rendezvous-node-id", required=True)
    p.add_argument("--hostname", required=True)
    p.add_argument("--assignment-file", required=True)
    p.add_argument("--max-peers", type=int, default=4)
    p.add_argument("--join-token")
    args = p.parse_args()
    agent = Agent(args)
    host, port = args.listen.rsplit(":", 1)
    mesh = await asyncio.start_server(agent.accept, host, int(port))
    servers = []
    for addr, serve in ((args.metrics, health), (args.test_api, agent.api)):
        host, port = addr.rsplit(":", 1)
        servers.append(await asyncio.start_server(serve, host, int(port)))
    metrics_addr, api_addr = ("%s:%d" % s.sockets[0].getsockname()[:2] for s in servers)
    mesh_addr = "%s:%d" % mesh.sockets[0].getsockname()[:2]
    asyncio.create_task(agent.rendezvous(f"wss://{mesh_addr}/crdt-sync"))
    asyncio.create_task(agent.follow())
    print(f"listening mesh={mesh_addr} metrics={metrics_addr} test-api={api_addr} node={agent.identity.node_id}",
          flush=True)
    await asyncio.gather(mesh.serve_forever(), *(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
