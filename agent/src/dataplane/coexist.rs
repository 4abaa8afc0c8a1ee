//! Coexistence with Docker's FORWARD rules. dockerd 20.10 sets the iptables `filter FORWARD`
//! policy to DROP when it had to enable IPv4 forwarding itself, and an accept in weft's own
//! nftables table cannot overrule a drop in another table: weft's bridged traffic (through
//! br_netfilter: containers on one host, fastdp and sleeve ports) and its routed traffic
//! (masquerade to the outside, into exposed subnets) would die.
//!
//! With iptables-nft, Docker's chains are nftables chains: weft puts its own accept rules,
//! tagged with the comment `weft:BRIDGE`, at the head of `DOCKER-USER` (the chain Docker jumps
//! to first and keeps across its restarts) and never touches Docker's rules. With
//! iptables-legacy the rules live in x_tables, which nftables cannot reach: weft detects the
//! DROP policy and says how to fix it ([`Coexistence::warning`]).
//!
//! The plan ([`ForwardAccept::rules`], [`stale`]) and the parsing of legacy tables are pure;
//! [`legacy_forward_policy`] reads the kernel.

use std::io;

use ipnet::Ipv4Net;

use super::nft::{ListedRule, XtRule};

/// Docker's chain for rules of its users, in `table ip filter`.
pub const DOCKER_USER: &str = "DOCKER-USER";
/// iptables' filter table.
pub const FILTER: &str = "filter";

/// What weft's forwarded traffic needs accepted before Docker's FORWARD rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardAccept {
    pub bridge: String,
    /// Exposed subnets: new connections into them from outside are accepted too.
    pub exposed: Vec<Ipv4Net>,
}

/// The comment that marks the rules of the agent owning `bridge`.
pub fn tag(bridge: &str) -> String {
    format!("weft:{bridge}")
}

impl ForwardAccept {
    /// `-i BRIDGE` (bridged traffic, with br_netfilter, and traffic leaving for elsewhere),
    /// `-o BRIDGE` RELATED,ESTABLISHED (replies), `-o BRIDGE -d NET` per exposed subnet.
    pub fn rules(&self) -> Vec<XtRule> {
        let rule = |iif: bool, daddr: Option<Ipv4Net>, established: bool| XtRule {
            iifname: iif.then(|| self.bridge.clone()),
            oifname: (!iif).then(|| self.bridge.clone()),
            daddr,
            established,
            comment: tag(&self.bridge),
        };
        let mut v = vec![rule(true, None, false), rule(false, None, true)];
        v.extend(self.exposed.iter().map(|net| rule(false, Some(*net), false)));
        v
    }
}

/// `None` when the chain starts with exactly `want` rules tagged `tag` and has no other
/// rules so tagged; otherwise the handles of all rules tagged `tag` (to be replaced).
pub fn stale(listed: &[ListedRule], tag: &str, want: usize) -> Option<Vec<u64>> {
    let ours = |r: &ListedRule| r.comment.as_deref() == Some(tag);
    let tagged: Vec<u64> = listed.iter().filter(|r| ours(r)).map(|r| r.handle).collect();
    let head_is_ours = listed.len() >= want && listed[..want].iter().all(ours);
    if head_is_ours && tagged.len() == want { None } else { Some(tagged) }
}

/// The state of weft's rules in `DOCKER-USER` after a reconciliation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerUser {
    /// There is no `DOCKER-USER` in iptables-nft's filter table (no Docker, or Docker uses
    /// iptables-legacy).
    Absent,
    /// weft's rules were there already.
    Intact,
    /// weft's rules were (re)written.
    Written,
}

/// A FORWARD policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Accept,
    Drop,
    Other,
}

/// What the host's FORWARD rules mean for weft's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coexistence {
    pub docker_user: DockerUser,
    /// The iptables-legacy FORWARD policy, when the legacy filter table exists.
    pub legacy_forward: Option<Policy>,
}

impl Coexistence {
    /// The warning for `weft status` and the log, when weft's traffic is being dropped by
    /// rules weft cannot change.
    pub fn warning(&self, bridge: &str) -> Option<String> {
        (self.legacy_forward == Some(Policy::Drop)).then(|| {
            format!(
                "the iptables-legacy FORWARD policy is DROP (set by dockerd when it enabled IPv4 \
                 forwarding itself), so traffic forwarded through {bridge} (containers on this \
                 host and on others, the outside, exposed subnets) is dropped, and weft cannot \
                 add rules to iptables-legacy. Fix now: iptables-legacy -I DOCKER-USER -i \
                 {bridge} -j ACCEPT && iptables-legacy -I DOCKER-USER -o {bridge} -j ACCEPT \
                 (kept across dockerd restarts, not reboots). For good: start weft before \
                 docker.service; weft enables IPv4 forwarding, so dockerd keeps the policy ACCEPT"
            )
        })
    }
}

/// Whether `/proc/net/ip_tables_names` lists the legacy filter table. Only then may it be
/// queried: asking x_tables for a table creates it in the namespace for good.
pub fn legacy_filter_present(names: &str) -> bool {
    names.lines().any(|l| l.trim() == FILTER)
}

// Layout of x_tables' getsockopt structures (linux/netfilter_ipv4/ip_tables.h).
const IPT_SO_GET_INFO: libc::c_int = 64;
const IPT_SO_GET_ENTRIES: libc::c_int = 65;
const TABLE_NAME_LEN: usize = 32;
/// `struct ipt_getinfo`: name, valid_hooks, hook_entry[5], underflow[5], num_entries, size.
const GETINFO_LEN: usize = TABLE_NAME_LEN + 4 + 20 + 20 + 4 + 4;
const GETINFO_UNDERFLOW: usize = TABLE_NAME_LEN + 4 + 20;
const GETINFO_SIZE: usize = GETINFO_LEN - 4;
/// `struct ipt_get_entries` before its entries (name, size, padding to the entries' u64s).
const GET_ENTRIES_HEADER: usize = TABLE_NAME_LEN + 8;
/// `struct ipt_entry`: offset of `target_offset`; `struct xt_entry_target` is 32 bytes
/// before a standard target's verdict.
const ENTRY_TARGET_OFFSET: usize = 88;
const TARGET_HEADER: usize = 32;
const NF_INET_FORWARD: usize = 2;

/// The policy of the FORWARD chain in a legacy filter table's entries: the standard target
/// of the rule at the chain's underflow (`-NF_DROP - 1` or `-NF_ACCEPT - 1`).
pub fn parse_forward_policy(underflow: usize, entries: &[u8]) -> Option<Policy> {
    let at = |o: usize, n: usize| entries.get(o..o + n);
    let target = at(underflow + ENTRY_TARGET_OFFSET, 2)?;
    let target = underflow + usize::from(u16::from_ne_bytes([target[0], target[1]]));
    let v = at(target + TARGET_HEADER, 4)?;
    Some(match i32::from_ne_bytes([v[0], v[1], v[2], v[3]]) {
        -1 => Policy::Drop,
        -2 => Policy::Accept,
        _ => Policy::Other,
    })
}

/// Reads the legacy FORWARD policy of the current namespace; `None` when there is no legacy
/// filter table (which is then not created).
pub fn legacy_forward_policy() -> io::Result<Option<Policy>> {
    match std::fs::read_to_string("/proc/net/ip_tables_names") {
        Ok(names) if legacy_filter_present(&names) => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    // SAFETY: plain socket creation; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut info = vec![0u8; GETINFO_LEN];
    info[..FILTER.len()].copy_from_slice(FILTER.as_bytes());
    getsockopt(&sock, IPT_SO_GET_INFO, &mut info)?;
    let word = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let underflow = word(&info, GETINFO_UNDERFLOW + 4 * NF_INET_FORWARD) as usize;
    let size = word(&info, GETINFO_SIZE) as usize;
    let mut entries = vec![0u8; GET_ENTRIES_HEADER + size];
    entries[..FILTER.len()].copy_from_slice(FILTER.as_bytes());
    entries[TABLE_NAME_LEN..TABLE_NAME_LEN + 4].copy_from_slice(&(size as u32).to_ne_bytes());
    getsockopt(&sock, IPT_SO_GET_ENTRIES, &mut entries)?;
    Ok(parse_forward_policy(underflow, &entries[GET_ENTRIES_HEADER..]))
}

fn getsockopt(sock: &std::os::fd::OwnedFd, opt: libc::c_int, buf: &mut [u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is valid for len bytes and the kernel writes at most len.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::IPPROTO_IP, opt, buf.as_mut_ptr().cast(), &mut len)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(handle: u64, comment: Option<&str>) -> ListedRule {
        ListedRule { handle, comment: comment.map(str::to_owned) }
    }

    #[test]
    fn rules_accept_the_bridge_replies_and_exposed_subnets() {
        let want =
            ForwardAccept { bridge: "weft".into(), exposed: vec!["10.2.1.0/24".parse().unwrap()] };
        let r = want.rules();
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|r| r.comment == "weft:weft"));
        assert_eq!((r[0].iifname.as_deref(), r[0].oifname.as_deref()), (Some("weft"), None));
        assert!(r[1].established && r[1].oifname.as_deref() == Some("weft"));
        assert_eq!(r[2].daddr, Some("10.2.1.0/24".parse().unwrap()));
        assert!(!r[2].established);
    }

    #[test]
    fn our_rules_at_the_head_are_intact() {
        let t = "weft:weft";
        let chain =
            [listed(5, Some(t)), listed(6, Some(t)), listed(2, None), listed(9, Some("admin"))];
        assert_eq!(stale(&chain, t, 2), None);
        // One missing (the count changed), one behind Docker's RETURN, duplicates: rewrite.
        assert_eq!(stale(&chain, t, 3), Some(vec![5, 6]));
        let behind = [listed(2, None), listed(5, Some(t)), listed(6, Some(t))];
        assert_eq!(stale(&behind, t, 2), Some(vec![5, 6]));
        let dup = [listed(5, Some(t)), listed(6, Some(t)), listed(7, Some(t))];
        assert_eq!(stale(&dup, t, 2), Some(vec![5, 6, 7]));
        // Another agent's rules (another bridge) are not ours.
        let other = [listed(3, Some("weft:other")), listed(2, None)];
        assert_eq!(stale(&other, t, 2), Some(vec![]));
    }

    #[test]
    fn only_a_legacy_drop_policy_warns() {
        let c = |p| Coexistence { docker_user: DockerUser::Absent, legacy_forward: p };
        assert!(c(None).warning("weft").is_none());
        assert!(c(Some(Policy::Accept)).warning("weft").is_none());
        let w = c(Some(Policy::Drop)).warning("weft").unwrap_or_default();
        assert!(w.contains("iptables-legacy -I DOCKER-USER -i weft -j ACCEPT"), "{w}");
        assert!(w.contains("before docker.service"), "{w}");
    }

    #[test]
    fn legacy_tables_are_listed_one_a_line() {
        assert!(legacy_filter_present("nat\nfilter\n"));
        assert!(!legacy_filter_present("nat\nmangle\n"));
        assert!(!legacy_filter_present(""));
    }

    #[test]
    fn the_forward_policy_is_the_verdict_at_the_underflow() {
        // Two entries of 152 bytes (112-byte ipt_entry + 40-byte standard target); the
        // second is FORWARD's policy.
        let mut entries = vec![0u8; 304];
        for (at, verdict) in [(0usize, -2i32), (152, -1)] {
            entries[at + ENTRY_TARGET_OFFSET..at + ENTRY_TARGET_OFFSET + 2]
                .copy_from_slice(&112u16.to_ne_bytes());
            let v = at + 112 + TARGET_HEADER;
            entries[v..v + 4].copy_from_slice(&verdict.to_ne_bytes());
        }
        assert_eq!(parse_forward_policy(0, &entries), Some(Policy::Accept));
        assert_eq!(parse_forward_policy(152, &entries), Some(Policy::Drop));
        assert_eq!(parse_forward_policy(300, &entries), None, "truncated");
    }
}
