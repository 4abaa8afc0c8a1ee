#!/usr/bin/env python3
"""Traffic for the end-to-end tests, run inside pod namespaces. Servers print "ready" once
they listen, so tests can wait for that line instead of sleeping.

  nettool.py serve PORT                     accept one TCP connection, count bytes to EOF, print the count
  nettool.py serve-many PORT                accept TCP connections one after another, each read to EOF, until killed
  nettool.py send IP PORT BYTES [MARKER]    send BYTES bytes (MARKER repeated in them), print the count
  nettool.py stream IP PORT SECONDS         send continuously for SECONDS; exit 1 on any error (e.g. a reset)
  nettool.py udp-recv PORT TIMEOUT [GROUP]  wait for one datagram (joining multicast GROUP), print it
  nettool.py udp-send IP PORT MESSAGE       send one datagram (broadcast allowed, multicast TTL 4)
  nettool.py udp-collect PORT STOP TIMEOUT  receive datagrams until one equals STOP; print them all,
                                            space-separated (a timeout prints what arrived, then TIMEOUT)
"""
import socket, struct, sys, time

def serve(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    n = 0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        n += len(d)
    print(n, flush=True)

def serve_many(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(20)
        try:
            while c.recv(1 << 16):
                pass
        except OSError:
            pass
        c.close()

def send(ip, port, total, marker):
    s = socket.create_connection((ip, port), timeout=20)
    chunk = (marker.encode() * (65536 // max(1, len(marker)) + 1))[:65536] if marker else bytes(65536)
    sent = 0
    while sent < total:
        sent += s.send(chunk[: min(len(chunk), total - sent)])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    print(sent, flush=True)

def stream(ip, port, seconds):
    s = socket.create_connection((ip, port), timeout=30)
    chunk = bytes(16384)
    end = time.time() + seconds
    sent = 0
    while time.time() < end:
        s.sendall(chunk)
        sent += len(chunk)
        time.sleep(0.001)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    print(sent, flush=True)

def udp_recv(port, timeout, group):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    if group:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0")))
    s.settimeout(timeout)
    print("ready", flush=True)
    data, addr = s.recvfrom(65536)
    print(data.decode(errors="replace"), flush=True)

def udp_send(ip, port, message):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 4)
    s.sendto(message.encode(), (ip, port))

def udp_collect(port, stop, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", port))
    s.settimeout(timeout)
    print("ready", flush=True)
    seen = []
    try:
        while True:
            data, _ = s.recvfrom(65536)
            seen.append(data.decode(errors="replace"))
            if seen[-1] == stop:
                break
    except socket.timeout:
        seen.append("TIMEOUT")
    print(" ".join(seen), flush=True)

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "serve":
    serve(int(args[0]))
elif cmd == "serve-many":
    serve_many(int(args[0]))
elif cmd == "send":
    send(args[0], int(args[1]), int(args[2]), args[3] if len(args) > 3 else "")
elif cmd == "stream":
    stream(args[0], int(args[1]), float(args[2]))
elif cmd == "udp-recv":
    udp_recv(int(args[0]), float(args[1]), args[2] if len(args) > 2 else "")
elif cmd == "udp-collect":
    udp_collect(int(args[0]), args[1], float(args[2]))
elif cmd == "udp-send":
    udp_send(args[0], int(args[1]), args[2])
else:
    sys.exit(__doc__)
