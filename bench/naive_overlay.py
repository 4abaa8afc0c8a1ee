#!/usr/bin/env python3
"""A deliberately naive userspace overlay, the floor sleeve must beat: one Ethernet frame per
UDP datagram between a TAP and one peer, no batching, no offloads.
usage: naive_overlay.py TAP LOCAL_IP PORT PEER_IP"""
import fcntl, os, select, socket, struct, sys

TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
name, local, port, peer = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tap = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
sock.bind((local, port))
sock.setblocking(False)
poll = select.epoll()
poll.register(tap, select.EPOLLIN)
poll.register(sock.fileno(), select.EPOLLIN)
while True:
    for fd, _ in poll.poll():
        while True:
            try:
                if fd == tap:
                    sock.sendto(os.read(tap, 65535), (peer, port))
                else:
                    os.write(tap, sock.recv(65535))
            except (BlockingIOError, OSError):
                break
