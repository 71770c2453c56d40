//! Memory and CPU of a process, from `/proc` (Linux): the hub's while it runs, and the
//! harness's own, so a report shows whether the harness was the bottleneck.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// One reading of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time, clock ticks.
    pub cpu_ticks: u64,
}

/// Clock ticks per second of `/proc/*/stat` times (`getconf CLK_TCK`; 100 on every common
/// Linux).
fn ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// Reads `pid`'s usage now.
pub fn sample(pid: u32) -> std::io::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse(&status, &stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/proc/{pid} is not in the expected format"),
        )
    })
}

fn parse(status: &str, stat: &str) -> Option<Usage> {
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    // The command name in parentheses may contain spaces; fields count from after it.
    // After ")": state(3) ppid(4) … utime(14) stime(15), so utime is the 12th field.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Usage {
        rss_bytes: rss_kib * 1024,
        cpu_ticks: utime + stime,
    })
}

/// CPU used between two readings over `wall`, in percent of one core (200 = two cores busy).
pub fn cpu_percent(from: Usage, to: Usage, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    let cpu = to.cpu_ticks.saturating_sub(from.cpu_ticks) as f64 / ticks_per_second() as f64;
    cpu / secs * 100.0
}

/// A process watched in the background: its latest and peak RSS, and whether it is alive.
#[derive(Debug)]
pub struct ProcWatch {
    /// The process.
    pub pid: u32,
    rss: AtomicU64,
    peak: AtomicU64,
    alive: AtomicBool,
}

impl ProcWatch {
    /// Starts sampling `pid` every 250 ms until the returned handle is dropped.
    pub fn spawn(pid: u32) -> Arc<Self> {
        let watch = Arc::new(Self {
            pid,
            rss: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        });
        watch.refresh();
        let weak: Weak<Self> = Arc::downgrade(&watch);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(w) => {
                        w.refresh();
                    }
                    None => return,
                }
            }
        });
        watch
    }

    /// Samples now; returns the reading if the process is alive.
    pub fn refresh(&self) -> Option<Usage> {
        match sample(self.pid) {
            Ok(u) => {
                self.rss.store(u.rss_bytes, Ordering::Relaxed);
                self.peak.fetch_max(u.rss_bytes, Ordering::Relaxed);
                Some(u)
            }
            Err(_) => {
                self.alive.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// The latest RSS, bytes.
    pub fn rss(&self) -> u64 {
        self.rss.load(Ordering::Relaxed)
    }

    /// The largest RSS seen, bytes.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Whether the process was alive at the last reading.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse_even_with_spaces_in_the_name() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t   2048 kB\n";
        let stat = "1234 (tokio worker 1) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3";
        assert_eq!(
            parse(status, stat),
            Some(Usage {
                rss_bytes: 2048 * 1024,
                cpu_ticks: 300
            })
        );
        assert_eq!(parse("VmRSS: x kB", stat), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let u = sample(std::process::id()).unwrap();
        assert!(u.rss_bytes > 1 << 20, "{u:?}");
    }
}
