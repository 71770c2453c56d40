//! Who is on a branch: each device's sessions, when it was last heard from, how far it has
//! applied the log (its lag), and the last `device_seq` the hub applied from it; and how many
//! events per second the branch takes.

use std::collections::HashMap;

use branchline_protocol::{DeviceInfo, Name, Role, UnixMillis, now_ms};

/// Devices seen within this long are listed even when offline.
const DEVICE_MEMORY_MS: i64 = 24 * 3600 * 1000;

#[derive(Clone, Debug)]
struct DeviceState {
    role: Role,
    sessions: u32,
    last_seen_ms: UnixMillis,
    acked_seq: Option<u64>,
    last_device_seq: u64,
}

impl DeviceState {
    fn new(role: Role) -> Self {
        Self {
            role,
            sessions: 0,
            last_seen_ms: now_ms(),
            acked_seq: None,
            last_device_seq: 0,
        }
    }
}

/// The devices of one branch.
#[derive(Default)]
pub struct Presence {
    devices: HashMap<Name, DeviceState>,
}

impl Presence {
    /// Devices known from the log (their last applied `device_seq`), none of them online.
    pub fn from_log(devices: &[(Name, u64)]) -> Self {
        let devices = devices
            .iter()
            .map(|(d, seq)| {
                let mut s = DeviceState::new(Role::Cashier);
                s.last_seen_ms = 0;
                s.last_device_seq = *seq;
                (d.clone(), s)
            })
            .collect();
        Self { devices }
    }

    fn entry(&mut self, device: &Name, role: Role) -> &mut DeviceState {
        self.devices
            .entry(device.clone())
            .or_insert_with(|| DeviceState::new(role))
    }

    /// A session of `device` started following the branch; true if it is the device's first.
    pub fn session_joined(&mut self, device: &Name, role: Role) -> bool {
        let s = self.entry(device, role);
        s.role = role;
        s.sessions += 1;
        s.last_seen_ms = now_ms();
        s.sessions == 1
    }

    /// A session of `device` stopped following the branch; true if it was the device's last.
    pub fn session_left(&mut self, device: &Name) -> bool {
        match self.devices.get_mut(device) {
            Some(s) if s.sessions > 0 => {
                s.sessions -= 1;
                s.last_seen_ms = now_ms();
                s.sessions == 0
            }
            _ => false,
        }
    }

    /// The hub heard from `device`.
    pub fn touch(&mut self, device: &Name) {
        if let Some(s) = self.devices.get_mut(device) {
            s.last_seen_ms = now_ms();
        }
    }

    /// `device` reports having applied up to `seq`.
    pub fn ack(&mut self, device: &Name, role: Role, seq: u64) {
        let s = self.entry(device, role);
        s.acked_seq = Some(s.acked_seq.map_or(seq, |a| a.max(seq)));
        s.last_seen_ms = now_ms();
    }

    /// Devices' last applied `device_seq`s, once the commit that carries them is durable.
    pub fn note_device_seqs(&mut self, seqs: &[(Name, u64)]) {
        let now = now_ms();
        for (device, seq) in seqs {
            let s = self.entry(device, Role::Cashier);
            s.last_device_seq = *seq;
            s.last_seen_ms = now;
        }
    }

    /// The last `device_seq` the hub applied from `device`.
    pub fn last_device_seq(&self, device: &Name) -> u64 {
        self.devices.get(device).map_or(0, |s| s.last_device_seq)
    }

    /// One device as admins see it, with the branch at `head`.
    pub fn device_info(&self, device: &Name, head: u64) -> Option<DeviceInfo> {
        self.devices.get(device).map(|s| info(device, s, head))
    }

    /// Devices online now or seen in the last day, by name, with the branch at `head`.
    pub fn devices(&self, head: u64) -> Vec<DeviceInfo> {
        let since = now_ms() - DEVICE_MEMORY_MS;
        let mut out: Vec<DeviceInfo> = self
            .devices
            .iter()
            .filter(|(_, s)| s.sessions > 0 || s.last_seen_ms >= since)
            .map(|(name, s)| info(name, s, head))
            .collect();
        out.sort_by(|a, b| a.device.cmp(&b.device));
        out
    }

    /// `(devices online, sessions)` following the branch.
    pub fn counts(&self) -> (u32, u32) {
        self.devices
            .values()
            .filter(|s| s.sessions > 0)
            .fold((0, 0), |(n, s), st| (n + 1, s + st.sessions))
    }
}

fn info(device: &Name, s: &DeviceState, head: u64) -> DeviceInfo {
    DeviceInfo {
        device: device.clone(),
        role: s.role,
        online: s.sessions > 0,
        sessions: s.sessions,
        last_seen_ms: s.last_seen_ms,
        acked_seq: s.acked_seq,
        lag: s.acked_seq.map(|a| head.saturating_sub(a)),
        last_device_seq: s.last_device_seq,
    }
}

/// Events per second over a sliding minute, in one-second buckets.
pub struct RateWindow {
    buckets: [u64; 60],
    last_sec: i64,
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            buckets: [0; 60],
            last_sec: now_ms() / 1000,
        }
    }
}

impl RateWindow {
    fn advance(&mut self, now_ms: UnixMillis) {
        let sec = now_ms / 1000;
        let gap = (sec - self.last_sec).clamp(0, 60);
        for i in 1..=gap {
            self.buckets[((self.last_sec + i).rem_euclid(60)) as usize] = 0;
        }
        self.last_sec = sec;
    }

    /// Counts `n` events at `now_ms`.
    pub fn add(&mut self, n: u64, now_ms: UnixMillis) {
        self.advance(now_ms);
        self.buckets[(self.last_sec.rem_euclid(60)) as usize] += n;
    }

    /// The rate over the last minute.
    pub fn per_second(&mut self, now_ms: UnixMillis) -> f64 {
        self.advance(now_ms);
        self.buckets.iter().sum::<u64>() as f64 / 60.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn sessions_count_per_device_and_lag_follows_acks() {
        let mut p = Presence::from_log(&[(name("till-1"), 7)]);
        assert_eq!(p.counts(), (0, 0));
        assert!(p.session_joined(&name("till-1"), Role::Cashier));
        assert!(
            !p.session_joined(&name("till-1"), Role::Cashier),
            "a second session"
        );
        assert_eq!(p.counts(), (1, 2));
        p.ack(&name("till-1"), Role::Cashier, 40);
        let info = p
            .device_info(&name("till-1"), 50)
            .unwrap_or_else(|| panic!("known"));
        assert_eq!(
            (info.last_device_seq, info.acked_seq, info.lag),
            (7, Some(40), Some(10))
        );
        assert!(!p.session_left(&name("till-1")));
        assert!(p.session_left(&name("till-1")), "its last session");
        assert!(!p.session_left(&name("till-1")), "no session left to leave");
    }

    #[test]
    fn the_rate_is_events_over_the_last_minute() {
        let mut rate = RateWindow::default();
        let t = 1_000_000_000;
        rate.add(60, t);
        rate.add(60, t + 30_000);
        assert_eq!(rate.per_second(t + 30_000), 2.0);
        assert_eq!(
            rate.per_second(t + 61_000),
            1.0,
            "the first bucket left the window"
        );
    }
}
