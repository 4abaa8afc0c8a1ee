#!/usr/bin/env python3
"""Crafts overlay packets that carry a UDP datagram to a pod, as an attacker on the underlay
would, for the tests that show weft does not accept them (see docs/security.md).

  inject.py vxlan HOST PORT VNI POD_MAC SRC_IP POD_IP UDP_PORT MESSAGE
      one VXLAN packet (RFC 7348: flags 0x08, 24-bit VNI) to HOST:PORT
  inject.py sleeve HOST PORT HOP_PEER DST_PEER POD_MAC SRC_IP POD_IP UDP_PORT MESSAGE
      one unencrypted sleeve data datagram (docs/sleeve.md) claiming to come from HOP_PEER
      (as hop sender and origin), for DST_PEER, carrying the frame in a single chunk

The inner frame is Ethernet (to POD_MAC) / IPv4 (SRC_IP -> POD_IP) / UDP (to UDP_PORT, no
checksum) with MESSAGE as its payload.
"""
import random, socket, struct, sys

def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def mac(s):
    return bytes(int(x, 16) for x in s.split(":"))

def frame(pod_mac, src_ip, pod_ip, port, message):
    udp = struct.pack("!HHHH", 40000, port, 8 + len(message), 0) + message
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.getrandbits(16), 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(pod_ip))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return mac(pod_mac) + mac("02:00:00:00:00:99") + b"\x08\x00" + ip + udp

def send(host, port, packet):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(packet, (host, int(port)))

cmd, a = sys.argv[1], sys.argv[2:]
if cmd == "vxlan":
    host, port, vni = a[0], a[1], int(a[2], 0)
    inner = frame(a[3], a[4], a[5], int(a[6]), a[7].encode())
    send(host, port, struct.pack("!II", 0x08 << 24, vni << 8) + inner)
elif cmd == "sleeve":
    host, port, hop, dst = a[0], a[1], mac(a[2]), mac(a[3])
    inner = bytes(10) + frame(a[4], a[5], a[6], int(a[7]), a[8].encode())  # virtio-net header
    header = struct.pack("!BB6s6s6sQIHH", 0x57, (16 << 2) | 1, hop, hop, dst,
                         random.getrandbits(40), random.getrandbits(32), 0, 1)
    send(host, port, header + inner)
else:
    sys.exit(__doc__)
