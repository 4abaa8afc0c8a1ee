//! The overlay switch of one peer link: which overlay carries our data to a directly connected
//! peer, decided from heartbeats. fastdp (the kernel's VXLAN) is preferred; sleeve (userspace
//! UDP) takes over when fastdp heartbeats stop or only small ones arrive; when neither works
//! the peer is reached through others (relayed). Switching back to fastdp waits until it has
//! been healthy for a while, so a flapping path does not flap the traffic. Pure: time is
//! passed in.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dataplane::VXLAN_OVERHEAD;

/// Heartbeats are sent this often on each overlay.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// An overlay whose full-size heartbeats have not been acknowledged for this long is down.
pub const DEAD_AFTER: Duration = Duration::from_secs(4);
/// A new link uses fastdp optimistically for this long before heartbeats must confirm it, so
/// that a restarted agent does not move established traffic away from working kernel state.
pub const GRACE: Duration = Duration::from_secs(5);
/// fastdp must be healthy this long before traffic moves back from sleeve.
pub const RETURN_AFTER: Duration = Duration::from_secs(3);

/// The overlays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlay {
    Fastdp,
    Sleeve,
}

impl Overlay {
    pub fn name(self) -> &'static str {
        match self {
            Overlay::Fastdp => "fastdp",
            Overlay::Sleeve => "sleeve",
        }
    }

    pub fn parse(s: &str) -> Option<Overlay> {
        match s {
            "fastdp" => Some(Overlay::Fastdp),
            "sleeve" => Some(Overlay::Sleeve),
            _ => None,
        }
    }
}

/// How data reaches a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Fastdp,
    Sleeve,
    /// Through other peers (sleeve, along data routes).
    Relayed,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Fastdp, Mode::Sleeve, Mode::Relayed];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Fastdp => "fastdp",
            Mode::Sleeve => "sleeve",
            Mode::Relayed => "relayed",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// Heartbeat bookkeeping of one overlay on one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    started: Instant,
    last_full: Option<Instant>,
    last_small: Option<Instant>,
    /// Why this overlay may not be used at all (encryption, --no-fastdp, peer lacks it).
    pub disabled: Option<String>,
}

impl Probe {
    pub fn new(now: Instant, disabled: Option<String>) -> Probe {
        Probe { started: now, last_full: None, last_small: None, disabled }
    }

    /// A heartbeat of ours was acknowledged at `at`; `full` if it had the full size (for
    /// sleeve: the datagram size in use on the link). An older time never replaces a newer.
    pub fn ack(&mut self, at: Instant, full: bool) {
        let t = if full { &mut self.last_full } else { &mut self.last_small };
        if t.is_none_or(|t| t < at) {
            *t = Some(at);
        }
    }

    fn recent(t: Option<Instant>, now: Instant) -> bool {
        t.is_some_and(|t| now.duration_since(t) < DEAD_AFTER)
    }

    /// Heartbeats confirm this overlay.
    pub fn confirmed(&self, now: Instant) -> bool {
        self.disabled.is_none() && Self::recent(self.last_full, now)
    }

    /// Usable: confirmed, or (with `optimistic`) still within the grace period of a new link.
    pub fn usable(&self, now: Instant, optimistic: bool) -> bool {
        self.confirmed(now)
            || (optimistic
                && self.disabled.is_none()
                && self.last_full.is_none()
                && now.duration_since(self.started) < GRACE)
    }

    /// A line for `weft status connections`. `mtu` is the frame size (without Ethernet
    /// header) this overlay's full heartbeats carry; `path_mtu` the largest underlay packet
    /// known to arrive (found by sleeve), if known.
    pub fn describe(
        &self,
        name: &str,
        now: Instant,
        mtu: u32,
        port: u16,
        path_mtu: Option<u32>,
    ) -> String {
        if let Some(d) = &self.disabled {
            return format!("{name} off: {d}");
        }
        if self.confirmed(now) {
            return format!("{name} ok");
        }
        let age =
            |t: Option<Instant>| t.map(|t| format!("{}s ago", now.duration_since(t).as_secs()));
        match (age(self.last_full), Self::recent(self.last_small, now)) {
            (_, true) if path_mtu.is_some_and(|p| p < mtu + VXLAN_OVERHEAD) => format!(
                "{name} down: only small heartbeats arrive (the path carries packets of at most {} bytes; {name} needs {})",
                path_mtu.unwrap_or_default(),
                mtu + VXLAN_OVERHEAD
            ),
            (_, true) => format!(
                "{name} down: only small heartbeats arrive (path MTU below the {}-byte frames?)",
                mtu + 14
            ),
            (Some(ago), false) => {
                format!("{name} down: last heartbeat acknowledged {ago} (UDP port {port} blocked?)")
            }
            (None, false) if now.duration_since(self.started) < GRACE => format!("{name} probing"),
            (None, false) => {
                format!("{name} down: no heartbeat acknowledged (UDP port {port} blocked?)")
            }
        }
    }
}

/// The overlay state of one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub fastdp: Probe,
    pub sleeve: Probe,
    mode: Mode,
    fastdp_good_since: Option<Instant>,
}

impl Link {
    /// A new link. fastdp starts in use (optimistically) unless it is disabled.
    pub fn new(now: Instant, fastdp_disabled: Option<String>) -> Link {
        let mode = if fastdp_disabled.is_none() { Mode::Fastdp } else { Mode::Sleeve };
        Link {
            fastdp: Probe::new(now, fastdp_disabled),
            sleeve: Probe::new(now, None),
            mode,
            fastdp_good_since: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Why the link is not at its best, given the descriptions of its two probes: `None` on
    /// fastdp that works (or is still within its first probing grace); otherwise why fastdp
    /// is not in use (on sleeve), or why neither overlay is (relayed). What `weft status
    /// connections` prints next to the overlay in use.
    pub fn degraded(&self, now: Instant, fastdp: &str, sleeve: &str) -> Option<String> {
        match self.mode {
            Mode::Fastdp if self.fastdp.usable(now, true) => None,
            Mode::Fastdp | Mode::Sleeve => Some(fastdp.to_owned()),
            Mode::Relayed => Some(format!("{fastdp}; {sleeve}")),
        }
    }

    /// Data can flow over this link (for data routes).
    pub fn established(&self, now: Instant) -> bool {
        self.fastdp.confirmed(now) || self.sleeve.confirmed(now)
    }

    /// Re-decides the mode; returns it if it changed.
    pub fn evaluate(&mut self, now: Instant) -> Option<Mode> {
        if self.fastdp.confirmed(now) {
            self.fastdp_good_since.get_or_insert(now);
        } else {
            self.fastdp_good_since = None;
        }
        let fastdp_ok = self.fastdp.usable(now, true);
        let returned =
            self.fastdp_good_since.is_some_and(|t| now.duration_since(t) >= RETURN_AFTER);
        let next = match self.mode {
            Mode::Fastdp if fastdp_ok => Mode::Fastdp,
            _ if fastdp_ok
                && (returned || self.mode == Mode::Relayed && self.fastdp.confirmed(now)) =>
            {
                Mode::Fastdp
            }
            _ if self.sleeve.usable(now, false) => Mode::Sleeve,
            // Nothing confirmed yet on a new link: sleeve is the safe guess while probing.
            _ if now.duration_since(self.sleeve.started) < GRACE => Mode::Sleeve,
            _ => Mode::Relayed,
        };
        (next != self.mode).then(|| {
            self.mode = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastdp_is_kept_while_heartbeats_flow_and_left_when_they_stop() {
        let t0 = Instant::now();
        let mut l = Link::new(t0, None);
        assert_eq!(l.mode(), Mode::Fastdp, "optimistic start");
        let mut t = t0;
        for _ in 0..10 {
            t += HEARTBEAT;
            l.fastdp.ack(t, true);
            l.sleeve.ack(t, true);
            assert_eq!(l.evaluate(t), None);
        }
        assert!(l.established(t));
        // UDP 6784 is blocked from now on: only sleeve acks arrive.
        let blocked = t;
        while l.mode() == Mode::Fastdp {
            t += HEARTBEAT;
            l.sleeve.ack(t, true);
            l.evaluate(t);
            assert!(t - blocked <= DEAD_AFTER + HEARTBEAT, "switched late");
        }
        assert_eq!(l.mode(), Mode::Sleeve);
        // Unblocked: back to fastdp, but only after RETURN_AFTER of health.
        let unblocked = t;
        while l.mode() == Mode::Sleeve {
            t += HEARTBEAT;
            l.fastdp.ack(t, true);
            l.sleeve.ack(t, true);
            l.evaluate(t);
            assert!(t - unblocked <= RETURN_AFTER + HEARTBEAT * 2);
        }
        assert!(t - unblocked >= RETURN_AFTER);
        assert_eq!(l.mode(), Mode::Fastdp);
    }

    #[test]
    fn small_heartbeats_only_mean_the_mtu_is_too_big() {
        let t0 = Instant::now();
        let mut l = Link::new(t0, None);
        let t = t0 + GRACE + HEARTBEAT;
        l.fastdp.ack(t, false);
        l.sleeve.ack(t, true);
        l.evaluate(t);
        assert_eq!(l.mode(), Mode::Sleeve);
        assert!(l.fastdp.describe("fastdp", t, 1450, 6784, None).contains("path MTU"));
        let why = l.fastdp.describe("fastdp", t, 1450, 6784, Some(720));
        assert!(why.contains("at most 720 bytes; fastdp needs 1500"), "{why}");
        // Sleeve keeps confirming (at the smaller datagram size path-MTU discovery found):
        // the link stays on sleeve, it does not become relayed.
        let mut t = t;
        for _ in 0..10 {
            t += HEARTBEAT;
            l.fastdp.ack(t, false);
            l.sleeve.ack(t, true);
            l.evaluate(t);
            assert_eq!(l.mode(), Mode::Sleeve);
        }
        assert!(l.established(t));
    }

    /// The reason shown next to the overlay in use: none while fastdp works or is still
    /// being probed on a new link, fastdp's problem on sleeve, both problems when relayed.
    #[test]
    fn only_a_degraded_link_says_why() {
        let t0 = Instant::now();
        let why = |l: &Link, t: Instant| {
            l.degraded(
                t,
                &l.fastdp.describe("fastdp", t, 1450, 6784, None),
                &l.sleeve.describe("sleeve", t, 1450, 6783, None),
            )
        };
        let mut l = Link::new(t0, None);
        assert_eq!(why(&l, t0), None, "a new link probing fastdp is not degraded");
        let t = t0 + HEARTBEAT;
        l.fastdp.ack(t, true);
        l.sleeve.ack(t, true);
        l.evaluate(t);
        assert_eq!(why(&l, t), None);
        // fastdp stops: sleeve carries the traffic, and the line says why.
        let t = t + DEAD_AFTER + HEARTBEAT;
        l.sleeve.ack(t, true);
        l.evaluate(t);
        assert_eq!(l.mode(), Mode::Sleeve);
        let w = why(&l, t).expect("degraded");
        assert!(w.starts_with("fastdp down: last heartbeat acknowledged"), "{w}");
        // Nothing works: relayed, with both reasons.
        let t = t + DEAD_AFTER + HEARTBEAT;
        l.evaluate(t);
        assert_eq!(l.mode(), Mode::Relayed);
        let w = why(&l, t).expect("degraded");
        assert!(w.contains("fastdp down") && w.contains("; sleeve down"), "{w}");
        // Encrypted: sleeve by design, and the line says so.
        let enc = Link::new(t0, Some("traffic to this peer is encrypted (sleeve only)".into()));
        let w = why(&enc, t0).expect("not fastdp");
        assert_eq!(w, "fastdp off: traffic to this peer is encrypted (sleeve only)");
    }

    #[test]
    fn disabled_fastdp_is_never_used_and_nothing_working_means_relayed() {
        let t0 = Instant::now();
        let mut l = Link::new(t0, Some("traffic to this peer is encrypted".into()));
        assert_eq!(l.mode(), Mode::Sleeve);
        l.fastdp.ack(t0, true);
        assert!(!l.fastdp.confirmed(t0));
        let later = t0 + GRACE * 2;
        l.evaluate(later);
        assert_eq!(l.mode(), Mode::Relayed);
        assert!(!l.established(later));
        l.sleeve.ack(later, true);
        l.evaluate(later);
        assert_eq!(l.mode(), Mode::Sleeve);
    }
}
