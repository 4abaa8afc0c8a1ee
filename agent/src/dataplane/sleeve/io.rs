//! The sleeve's two kernel interfaces: a TAP port on the bridge with the virtio-net header and
//! segmentation offloads on (one read or write moves up to a 64 KiB TCP super-frame instead of
//! one MTU-sized frame), and a UDP socket that sends many datagrams per call (UDP_SEGMENT) and
//! receives coalesced ones (UDP_GRO).

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};

use super::codec::VNET_HDR;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_TSO_ECN: libc::c_ulong = 0x08;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TAP device with virtio-net headers and offloads.
#[derive(Debug)]
pub struct Tap {
    file: File,
    pub name: String,
}

impl Tap {
    /// Creates (or attaches to) the TAP `name`.
    pub fn open(name: &str) -> io::Result<Tap> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
        let mut req =
            IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        let n = name.len().min(15);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: `req` is a correctly laid out ifreq for TUNSETIFF.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap { file, name: name.to_owned() })
    }

    /// Reads one frame with its virtio-net header (blocking).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame with its virtio-net header.
    pub fn write(&self, frame: &[u8]) -> io::Result<()> {
        (&self.file).write(frame).map(drop)
    }

    /// Writes a plain Ethernet frame (no offload) with an empty virtio-net header.
    pub fn write_plain(&self, frame: &[u8]) -> io::Result<()> {
        let mut out = vec![0u8; VNET_HDR + frame.len()];
        out[VNET_HDR..].copy_from_slice(frame);
        self.write(&out)
    }
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid descriptor and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The sleeve's UDP socket.
#[derive(Debug)]
pub struct Udp {
    pub sock: UdpSocket,
    gso: std::sync::atomic::AtomicBool,
}

impl Udp {
    pub fn bind(addr: SocketAddr) -> io::Result<Udp> {
        let sock = UdpSocket::bind(addr)?;
        let fd = sock.as_raw_fd();
        // Big buffers absorb bursts of super-frames; FORCE works as root beyond rmem_max.
        for (force, plain) in
            [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)]
        {
            if setsockopt_int(fd, libc::SOL_SOCKET, force, 8 << 20).is_err() {
                let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, 8 << 20);
            }
        }
        // Outer packets may be fragmented by the kernel rather than dropped.
        let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
        let _ = setsockopt_int(fd, SOL_UDP, UDP_GRO, 1);
        Ok(Udp { sock, gso: std::sync::atomic::AtomicBool::new(true) })
    }

    /// Sends `buf`, a run of datagrams of `segment` bytes each (the last may be shorter), to
    /// `to` — in one call with UDP_SEGMENT when the kernel supports it.
    pub fn send_segments(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        if buf.len() <= segment {
            return self.sock.send_to(buf, to).map(drop);
        }
        self.send_parts(&[IoSlice::new(buf)], segment, to)
    }

    /// Sends the concatenation of `parts` as datagrams of `segment` bytes (the last may be
    /// shorter): headers and payloads are gathered by the kernel, not copied here. Falls back
    /// to one datagram per call when segmentation offload is unavailable.
    pub fn send_parts(
        &self,
        parts: &[IoSlice<'_>],
        segment: usize,
        to: SocketAddr,
    ) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.gso.load(Relaxed) {
            match self.send_gso_iov(parts, segment, to) {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT)
                    ) =>
                {
                    tracing::info!(error = %e, "UDP segmentation offload unavailable; sending datagrams one by one");
                    self.gso.store(false, Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        // One datagram per call; a single buffer is cut in place, several are joined first.
        let joined: Vec<u8>;
        let all: &[u8] = match parts {
            [one] => one,
            _ => {
                joined = parts.iter().flat_map(|p| p.iter().copied()).collect();
                &joined
            }
        };
        for d in all.chunks(segment) {
            self.sock.send_to(d, to)?;
        }
        Ok(())
    }

    fn send_gso_iov(
        &self,
        parts: &[IoSlice<'_>],
        segment: usize,
        to: SocketAddr,
    ) -> io::Result<()> {
        let (addr, addr_len) = sockaddr(to);
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        // On the stack, aligned for `cmsghdr` (u64 words); 32 bytes hold one u16 cmsg.
        let mut control = [0u64; 4];
        assert!(space <= size_of_val(&control), "cmsg buffer too small");
        // SAFETY: zeroed msghdr is valid; fields are filled in below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&addr as *const libc::sockaddr_storage).cast_mut().cast();
        msg.msg_namelen = addr_len;
        // IoSlice is guaranteed to be ABI-compatible with iovec.
        msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = parts.len();
        if total > segment {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
        }
        // SAFETY: the control buffer has room for one u16 cmsg (CMSG_SPACE above).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            if c.is_null() {
                let n = libc::sendmsg(self.sock.as_raw_fd(), &msg, 0);
                return if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
            }
            (*c).cmsg_level = SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment as u16);
        }
        // SAFETY: `msg` points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, 0) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Receives datagrams (possibly several coalesced by GRO); returns the byte count, the
    /// size of each datagram in the buffer (0 = one datagram) and the sender.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: zeroed sockaddr_storage and msghdr are valid; fields are filled in below.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut control = [0u8; 64];
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: all pointers in `msg` refer to live buffers.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut segment = 0usize;
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    segment = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>()) as usize;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, segment, from_storage(&from)))
    }
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; the family-specific view is filled below.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            (s, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            (s, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn from_storage(s: &libc::sockaddr_storage) -> SocketAddr {
    if i32::from(s.ss_family) == libc::AF_INET6 {
        // SAFETY: the kernel filled an AF_INET6 address.
        let sin6 = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
        SocketAddr::from((sin6.sin6_addr.s6_addr, u16::from_be(sin6.sin6_port)))
    } else {
        // SAFETY: the kernel filled an AF_INET address.
        let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        SocketAddr::from((
            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
            u16::from_be(sin.sin_port),
        ))
    }
}

/// Duplicates a descriptor-backed file so two threads can use it.
pub fn dup_file(f: &File) -> io::Result<File> {
    // SAFETY: dup of a valid descriptor; the new one is owned by the returned File.
    let fd = unsafe { libc::dup(f.as_raw_fd()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}
