//! Process hardening at agent start, before any thread exists (capabilities, the bounding set
//! and no_new_privs are per thread and inherited by threads created later): the soft file
//! descriptor limit raised to the hard one, every capability outside [`agent_capabilities`]
//! dropped from the effective, permitted, inheritable, ambient and bounding sets, and
//! `PR_SET_NO_NEW_PRIVS` set. The agent keeps uid 0 (its files are root's).

use std::io;

/// Capability numbers from linux/capability.h.
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
pub const CAP_SYS_MODULE: u32 = 16;
pub const CAP_SYS_ADMIN: u32 = 21;

/// What each kept capability is for (docs/security.md lists the same).
/// - NET_ADMIN: links, addresses, routes, nftables, the VXLAN device, the TAP, sysctls.
/// - SYS_ADMIN: `setns` into pods' network namespaces.
/// - NET_RAW: fastdp's heartbeat packet socket.
/// - NET_BIND_SERVICE: the DNS server on port 53.
/// - SYS_MODULE (Kubernetes mode only): loading br_netfilter with `finit_module`.
pub fn agent_capabilities(kube: bool) -> u64 {
    let mut caps = [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_NET_RAW, CAP_NET_BIND_SERVICE]
        .iter()
        .fold(0u64, |m, c| m | (1 << c));
    if kube {
        caps |= 1 << CAP_SYS_MODULE;
    }
    caps
}

#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    #[error("{what}: {error}")]
    Sys { what: &'static str, error: io::Error },
}

fn sys(what: &'static str, rc: libc::c_int) -> Result<libc::c_int, HardenError> {
    if rc < 0 { Err(HardenError::Sys { what, error: io::Error::last_os_error() }) } else { Ok(rc) }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> Result<u64, HardenError> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-parameter.
    sys("getrlimit(RLIMIT_NOFILE)", unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid, initialised rlimit.
        sys("setrlimit(RLIMIT_NOFILE)", unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// The highest capability number the kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Keeps only `keep` (a mask of capability numbers) in every set of the calling thread and
/// sets no_new_privs. Must run before the process starts threads.
pub fn restrict_capabilities(keep: u64) -> Result<(), HardenError> {
    for cap in 0..=last_cap() {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let present =
            unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) };
        if present > 0 {
            // SAFETY: as above.
            sys("prctl(PR_CAPBSET_DROP)", unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0)
            })?;
        }
    }
    // SAFETY: as above.
    sys("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    })?;
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two data structs, as capget(2) requires for version 3.
    sys("capget", unsafe {
        libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) as libc::c_int
    })?;
    for (i, d) in data.iter_mut().enumerate() {
        let mask = (keep >> (32 * i)) as u32;
        d.effective &= mask;
        d.permitted &= mask;
        d.inheritable = 0;
    }
    // SAFETY: as for capget.
    sys("capset", unsafe {
        libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) as libc::c_int
    })?;
    // SAFETY: prctl with integer arguments only.
    sys("prctl(PR_SET_NO_NEW_PRIVS)", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_masks() {
        assert_eq!(agent_capabilities(false), 0x0020_3400);
        assert_eq!(agent_capabilities(true), 0x0021_3400);
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let soft = raise_fd_limit().unwrap();
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: valid out-parameter.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!((soft, lim.rlim_cur), (lim.rlim_max, lim.rlim_max));
    }
}
