#!/usr/bin/env python3
"""Runs code in a Jupyter kernel over wss:// through the gateway's name route, with the
standard library only (the end-to-end test's client; no websocket package needed).

    jupyter_kernel.py HOST PORT TOKEN CAFILE CODE

Connects to 127.0.0.1:PORT with HOST as the TLS server name (what DNS would resolve), checks
the gateway's certificate against CAFILE, starts a kernel (REST), sends an execute_request on
the kernel's websocket channel and prints what the code wrote to stdout. Exit 0 when the
kernel answered, 1 with a message otherwise.
"""

import base64
import json
import os
import socket
import ssl
import struct
import sys
import time
import uuid


def connect(host, port, cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    return ctx.wrap_socket(raw, server_hostname=host)


def read_head(sock):
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise RuntimeError("closed before the answer's head: %r" % head)
        head += chunk
    return head.decode("latin-1")


def http(host, port, cafile, method, path, body=b""):
    s = connect(host, port, cafile)
    req = "%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        method, path, host, len(body))
    s.sendall(req.encode() + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    if b"transfer-encoding: chunked" in head.lower():
        out = b""
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        rest = out
    return status, rest


def send_frame(sock, text):
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(header + mask + masked)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("websocket closed")
        data += chunk
    return data


def recv_message(sock):
    """One whole message (fragments joined); control frames are skipped."""
    parts = b""
    while True:
        b0, b1 = recv_exact(sock, 2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", recv_exact(sock, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", recv_exact(sock, 8))[0]
        payload = recv_exact(sock, n)
        opcode = b0 & 0x0F
        if opcode == 8:
            raise RuntimeError("websocket closed by the server")
        if opcode in (9, 10):
            continue
        parts += payload
        if b0 & 0x80:
            return parts.decode("utf-8", "replace")


def main():
    host, port, token, cafile, code = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    status, body = http(host, port, cafile, "POST", "/api/kernels?token=" + token, b"{}")
    if status != 201:
        print("start kernel: HTTP %d %s" % (status, body[:200]), file=sys.stderr)
        return 1
    kernel = json.loads(body)["id"]
    try:
        s = connect(host, port, cafile)
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = (
            "GET /api/kernels/%s/channels?token=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ) % (kernel, token, host, key)
        s.sendall(upgrade.encode())
        head = read_head(s)
        if " 101 " not in head.splitlines()[0]:
            print("websocket upgrade: %s" % head.splitlines()[0], file=sys.stderr)
            return 1
        msg_id = uuid.uuid4().hex
        send_frame(s, json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "e2e",
                       "session": uuid.uuid4().hex, "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        out, deadline = "", time.time() + 60
        while time.time() < deadline:
            msg = json.loads(recv_message(s))
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
            if kind == "stream":
                out += msg["content"].get("text", "")
            elif kind == "error":
                print("kernel error: %s" % msg["content"].get("evalue"), file=sys.stderr)
                return 1
            elif kind == "status" and msg["content"].get("execution_state") == "idle" and out:
                break
        print(out, end="")
        return 0 if out else 1
    finally:
        http(host, port, cafile, "DELETE", "/api/kernels/%s?token=%s" % (kernel, token))


if __name__ == "__main__":
    sys.exit(main())
