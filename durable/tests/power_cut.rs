//! sled on a disk that loses its power: a child process writes and flushes as fast as it can
//! and prints each key once its flush returned; the test kills it with `kill -9` at random
//! moments, cuts the power (the disk keeps only what was synced), and starts it again on what
//! survived.
//!
//! With [`DurableDir::sync`] after each flush every printed key survives every cut, large
//! values (sled's blob files) included. With sled's flush alone they do not: the same
//! workload loses acknowledged keys, which shows the harness catches what it is meant to.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use branchline_durable::{DurableDir, prepare};
use branchline_powercut::{Cut, PowerCutFs};
use rand::{Rng, SeedableRng};

const CHILD_DIR: &str = "DURABLE_TEST_CHILD_DIR";
const CHILD_SYNC: &str = "DURABLE_TEST_CHILD_SYNC";

/// The value stored under key `k`: every seventh one is large enough for a blob file.
fn value_of(k: u64) -> Vec<u8> {
    let len = if k % 7 == 0 {
        200 * 1024
    } else {
        100 + (k as usize * 37) % 2_000
    };
    k.to_be_bytes().iter().copied().cycle().take(len).collect()
}

/// The child: reports what the store holds, then writes and acknowledges until killed.
fn child(dir: &Path, sync: bool) -> ! {
    prepare(dir).unwrap();
    let db = match sled::Config::new().path(dir).flush_every_ms(None).open() {
        Ok(db) => db,
        Err(e) => {
            println!("\nunopenable {e}");
            std::process::exit(0);
        }
    };
    let durable = sync.then(|| DurableDir::open(dir).unwrap());
    // The test harness has printed a line's beginning; ours start on lines of their own.
    println!();
    let mut next = 1;
    for kv in db.iter() {
        let (k, v) = kv.unwrap();
        let k = u64::from_be_bytes(k.as_ref().try_into().unwrap());
        if v.as_ref() != value_of(k).as_slice() {
            println!("bad {k}");
        }
        println!("have {k}");
        next = next.max(k + 1);
    }
    println!("ready");
    let mut rng = rand::rng();
    loop {
        let last = next + rng.random_range(0..8);
        for k in next..=last {
            db.insert(k.to_be_bytes(), value_of(k)).unwrap();
        }
        db.flush().unwrap();
        if let Some(durable) = &durable {
            durable.sync().unwrap();
        }
        println!("acked {last}");
        next = last + 1;
    }
}

/// A running child and the lines it printed.
struct Writer {
    process: Child,
    lines: mpsc::Receiver<String>,
}

impl Writer {
    fn start(dir: &Path, sync: bool) -> Self {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                if sync {
                    "every_synced_write_survives_power_cuts"
                } else {
                    "sled_flush_alone_loses_acknowledged_writes"
                },
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir)
            .env(CHILD_SYNC, if sync { "1" } else { "0" })
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(process.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { process, lines }
    }

    /// The keys the store held when it started, or why it could not be opened.
    fn found(&self) -> Result<BTreeSet<u64>, String> {
        let mut have = BTreeSet::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the child reports its store");
            match line.split_once(' ') {
                Some(("have", k)) => {
                    have.insert(k.parse().unwrap());
                }
                Some(("bad", k)) => panic!("key {k} holds the wrong value"),
                Some(("unopenable", why)) => return Err(why.to_string()),
                _ if line == "ready" => return Ok(have),
                _ => {}
            }
        }
    }

    /// Lets it write for `run`, kills it, and returns the last key it acknowledged.
    fn kill_after(mut self, run: Duration) -> Option<u64> {
        let deadline = Instant::now() + run;
        let mut acked = None;
        let mut take = |line: String| {
            if let Some(k) = line.strip_prefix("acked ") {
                acked = Some(k.parse::<u64>().unwrap());
            }
        };
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => take(line),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the child died"),
            }
        }
        self.process.kill().unwrap();
        self.process.wait().unwrap();
        // Everything it printed before it died was acknowledged.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            take(line);
        }
        acked
    }
}

/// What a run of kill-and-cut rounds found.
struct Outcome {
    /// Per round, the acknowledged keys missing after it.
    missing: Vec<usize>,
    /// Why the store could not be opened after the last round, if it could not.
    unopenable: Option<String>,
    /// Bytes of unsynced pages the cuts took back.
    bytes_lost: u64,
}

/// Runs `cuts` kill-and-cut rounds.
fn run(sync: bool, cuts: usize, seed: u64) -> Outcome {
    let mnt = tempfile::tempdir().unwrap();
    let mut fs = PowerCutFs::mount(mnt.path()).unwrap();
    let dir = fs.path().join("store");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acked = 0u64;
    let mut outcome = Outcome {
        missing: Vec::new(),
        unopenable: None,
        bytes_lost: 0,
    };
    for round in 0..=cuts {
        let writer = Writer::start(&dir, sync);
        let found = match writer.found() {
            Ok(found) => found,
            Err(why) => {
                assert!(!sync, "round {round}: the store cannot be opened: {why}");
                eprintln!("round {round}: the store cannot be opened: {why}");
                writer.kill_after(Duration::ZERO);
                outcome.unopenable = Some(why);
                break;
            }
        };
        let lost = (1..=acked).filter(|k| !found.contains(k)).count();
        eprintln!(
            "round {round}: {} keys found, {lost} of {acked} acknowledged missing",
            found.len()
        );
        outcome.missing.push(lost);
        if sync {
            assert_eq!(lost, 0, "round {round}: acknowledged keys lost");
            assert!(found.iter().all(|&k| k <= acked + 8), "only written keys");
        }
        if round == cuts {
            writer.kill_after(Duration::ZERO);
            break;
        }
        if let Some(last) = writer.kill_after(Duration::from_millis(rng.random_range(20..200))) {
            acked = acked.max(last);
        }
        let how = if round % 2 == 0 {
            Cut::DropUnsynced
        } else {
            Cut::Torn { seed: rng.random() }
        };
        outcome.bytes_lost += fs.cut(how).unwrap().bytes_lost;
    }
    assert!(acked > 0, "the writer acknowledged something");
    outcome
}

fn child_mode() -> Option<(std::path::PathBuf, bool)> {
    let dir = std::env::var_os(CHILD_DIR)?;
    Some((
        dir.into(),
        std::env::var(CHILD_SYNC).is_ok_and(|v| v == "1"),
    ))
}

#[test]
fn every_synced_write_survives_power_cuts() {
    if let Some((dir, sync)) = child_mode() {
        child(&dir, sync);
    }
    let outcome = run(true, 24, 7);
    assert!(outcome.missing.iter().all(|&n| n == 0));
    assert!(
        outcome.bytes_lost > 0,
        "the cuts took back unsynced writes (else they tested nothing)"
    );
}

#[test]
fn sled_flush_alone_loses_acknowledged_writes() {
    if let Some((dir, sync)) = child_mode() {
        child(&dir, sync);
    }
    let outcome = run(false, 4, 11);
    assert!(
        outcome.missing.iter().any(|&n| n > 0) || outcome.unopenable.is_some(),
        "without explicit syncs a power cut takes back flushed writes: {:?}",
        outcome.missing
    );
}
