//! A branch's single writer: every command for a branch goes through one task, so `seq`
//! assignment, dedup, `device_seq` checks and state changes never race.
//!
//! The writer takes all queued commands at once, runs each through the branch's
//! [`Sequencer`], and hands one [`CommitItem`] to the group committer; it does not wait for the
//! flush before sequencing the next round (pipelining), and every answer is sent by the
//! committer after the flush, in command order. What the sequencer needs from the store (an
//! event id the Bloom filter cannot rule out, a count's movements, a conflict's record) is read
//! on a blocking thread before the command is sequenced: the async runtime never waits on
//! the disk.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use branchline_protocol::http::{PushResult, ResolveRequest, ResolveResponse};
use branchline_protocol::{BranchKey, ErrorCode, EventBody, Name, Publish, Rejected, Sku};
use futures::FutureExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::commit::{CommitItem, CommitSender, Reply};
use super::core::BranchCore;
use super::dedup::DedupFilter;
use super::log::{EventLog, Op, StoreError};
use crate::engine::health::StoreHealth;
use crate::engine::sequence::{
    Lookups, Outcome, Sequenced, Sequencer, code_message, failed_answer, shutting_down, sku_delta,
};
use crate::engine::{Answer, FRAME_EVENT_BYTES, Origin, Publication, StoredEvent, Unwritable};
use crate::state::{Change, Policies, Refused, StateSnapshot};

/// Commands a writer takes per round: one commit item carries them all.
const ROUND: usize = 512;
/// Commands queued per branch before senders wait.
const MAILBOX: usize = 4_096;

/// What every writer needs from the engine.
#[derive(Clone)]
pub struct WriterCtx {
    /// The store.
    pub log: Arc<dyn EventLog>,
    /// Where commits go.
    pub committer: CommitSender,
    /// Conflict policies.
    pub policies: Policies,
    /// Whether the store takes writes.
    pub health: Arc<StoreHealth>,
    /// Tracks writer tasks for shutdown.
    pub tracker: TaskTracker,
}

/// A SKU's stock movements after some seq: their sum, up to and including `until`.
#[derive(Clone, Copy, Debug)]
pub struct Moved {
    until: u64,
    sum: i64,
}

/// The movements of `sku` sequenced in `after < seq <= until`, from the log (committed
/// events only). A hole (retention trimmed past `after`) is `stale_base`.
fn movements(
    log: &dyn EventLog,
    key: &BranchKey,
    sku: &Sku,
    after: u64,
    until: u64,
) -> Result<Moved, Refused> {
    let mut moved = Moved {
        until: after,
        sum: 0,
    };
    while moved.until < until {
        let events = log
            .read_events(key, moved.until, until, 1024)
            .map_err(|e| unreadable(&e))?;
        if events.first().is_none_or(|e| e.seq != moved.until + 1) {
            return Err(Refused::new(
                ErrorCode::StaleBase,
                "the log was trimmed past base_seq; count again",
            ));
        }
        for e in &events {
            moved.sum = moved.sum.saturating_add(sku_delta(&e.bytes, sku)?);
            moved.until = e.seq;
        }
    }
    Ok(moved)
}

fn unreadable(e: &StoreError) -> Refused {
    tracing::error!(error = %e, "reading the store failed");
    Refused::new(ErrorCode::StorageUnavailable, "the store cannot be read")
}

/// Runs `read` on a blocking thread (the runtime's threads never wait on the disk).
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, Refused> + Send + 'static,
) -> Result<T, Refused> {
    tokio::task::spawn_blocking(read).await.unwrap_or_else(|_| {
        Err(Refused::new(
            ErrorCode::ShuttingDown,
            "the hub is shutting down",
        ))
    })
}

enum Cmd {
    Publish {
        publish: Box<Publish>,
        origin: Origin,
        /// For a `stock.counted`: its SKU's movements from `base_seq` up to the head when it
        /// was submitted, read from the log before it reached the writer.
        moved: Option<Result<Moved, Refused>>,
        reply: oneshot::Sender<PushResult>,
    },
    Resolve {
        id: Uuid,
        request: ResolveRequest,
        admin: Name,
        reply: oneshot::Sender<Result<ResolveResponse, Rejected>>,
    },
    Snapshot {
        reply: oneshot::Sender<Result<(StateSnapshot, u64), ErrorCode>>,
    },
}

/// A handle to a branch's writer.
pub struct WriterHandle {
    /// What the engine's threads share about the branch.
    pub core: Arc<BranchCore>,
    tx: mpsc::Sender<Cmd>,
    log: Arc<dyn EventLog>,
}

impl WriterHandle {
    /// Queues a publish behind those queued before it; its answer resolves after the commit.
    pub async fn publish(&self, publish: Publish, origin: Origin) -> Answer {
        let (reply, rx) = oneshot::channel();
        let moved = match (&publish.body, publish.base_seq) {
            // The long part of a count, reading the log since its base, happens here, off the
            // writer: the writer then adds only what was sequenced since.
            (EventBody::StockCounted(c), base_seq) => {
                let (log, key, sku) = (self.log.clone(), self.core.key.clone(), c.sku.clone());
                let (after, until) = (base_seq.unwrap_or(0), self.core.committed());
                Some(blocking(move || movements(&*log, &key, &sku, after, until)).await)
            }
            _ => None,
        };
        let (event_id, branch) = (publish.event_id, publish.branch.clone());
        let cmd = Cmd::Publish {
            publish: Box::new(publish),
            origin,
            moved,
            reply,
        };
        if self.tx.send(cmd).await.is_err() {
            return futures::future::ready(shutting_down(Some(event_id), &branch)).boxed();
        }
        rx.map(move |answer| answer.unwrap_or_else(|_| shutting_down(Some(event_id), &branch)))
            .boxed()
    }

    /// Resolves a held conflict; answers after the `conflict.resolved` event is durable.
    pub async fn resolve(
        &self,
        id: Uuid,
        request: ResolveRequest,
        admin: Name,
    ) -> Result<ResolveResponse, Rejected> {
        let gone = || match shutting_down(None, &self.core.key.branch) {
            PushResult::Rejected(r) => r,
            PushResult::Accepted(_) => Rejected::bare(ErrorCode::ShuttingDown, "shutting down"),
        };
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Resolve {
            id,
            request,
            admin,
            reply,
        };
        if self.tx.send(cmd).await.is_err() {
            return Err(gone());
        }
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// A snapshot of the branch state and the seq it is exactly at, once that seq is durable.
    pub async fn snapshot(&self) -> Result<(StateSnapshot, u64), ErrorCode> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Cmd::Snapshot { reply }).await.is_err() {
            return Err(ErrorCode::ShuttingDown);
        }
        rx.await.unwrap_or(Err(ErrorCode::ShuttingDown))
    }
}

/// Starts the writer of a branch the store loaded.
pub fn spawn(
    core: Arc<BranchCore>,
    sequencer: Sequencer,
    known: DedupFilter,
    ctx: WriterCtx,
) -> WriterHandle {
    let (tx, rx) = mpsc::channel(MAILBOX);
    let log = ctx.log.clone();
    let tracker = ctx.tracker.clone();
    let writer = Writer {
        core: core.clone(),
        seq: sequencer,
        uncommitted: VecDeque::new(),
        uncommitted_ids: HashMap::new(),
        known,
        ctx,
    };
    tracker.spawn(writer.run(rx));
    WriterHandle { core, tx, log }
}

/// An event sequenced but perhaps not yet durable.
struct Pending {
    seq: u64,
    event_id: Uuid,
    bytes: bytes::Bytes,
}

/// The single writer of one branch.
struct Writer {
    core: Arc<BranchCore>,
    ctx: WriterCtx,
    seq: Sequencer,
    uncommitted: VecDeque<Pending>,
    uncommitted_ids: HashMap<Uuid, (u64, u64)>,
    /// Which event ids the branch may have accepted: most new ids skip the store lookup.
    known: DedupFilter,
}

/// A round's work in progress.
struct Round {
    item: CommitItem,
    events: Vec<StoredEvent>,
    /// Each event's id and content hash (its dedup entry), in the order of `events`.
    ids: Vec<(Uuid, u64)>,
    /// Bytes of the events' encodings.
    bytes: usize,
}

/// What the sequencer asks of the store, read before it is asked.
struct Prefetched<'a> {
    known: Option<Result<Option<(u64, u64)>, Refused>>,
    moved: Option<Result<i64, Refused>>,
    health: &'a StoreHealth,
}

impl Lookups for Prefetched<'_> {
    fn known(&mut self, _event_id: &Uuid) -> Result<Option<(u64, u64)>, Refused> {
        self.known.take().unwrap_or(Ok(None))
    }

    fn moved_since(&mut self, _sku: &Sku, _base_seq: u64, _head: u64) -> Result<i64, Refused> {
        self.moved.take().unwrap_or(Ok(0))
    }

    fn writable(&self) -> Result<(), Unwritable> {
        self.health.writable()
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut cmds = Vec::with_capacity(ROUND);
        while rx.recv_many(&mut cmds, ROUND).await > 0 {
            self.forget_committed();
            let mut round = self.round(cmds.len());
            for cmd in cmds.drain(..) {
                self.handle(cmd, &mut round).await;
                // A round is one live frame for every follower: it ends once its events fill one.
                if round.bytes >= FRAME_EVENT_BYTES {
                    let full = std::mem::replace(&mut round, self.round(ROUND));
                    self.finish(full).await;
                }
            }
            self.finish(round).await;
        }
    }

    fn round(&self, commands: usize) -> Round {
        Round {
            item: CommitItem {
                core: self.core.clone(),
                ops: Vec::new(),
                head: self.seq.head(),
                publication: None,
                replies: Vec::with_capacity(commands),
                device_seqs: Vec::new(),
                oversold: 0,
                open_conflicts: 0,
            },
            events: Vec::new(),
            ids: Vec::new(),
            bytes: 0,
        }
    }

    /// Hands a round to the committer.
    async fn finish(&mut self, round: Round) {
        let Round {
            mut item,
            events,
            ids,
            ..
        } = round;
        item.head = self.seq.head();
        if !events.is_empty() {
            // The round's events, dedup entries, head and device counters go to the store as
            // a few values (see `keys`); the state ops are already in `item.ops`.
            item.ops.push(Op::Round {
                branch: self.core.key.clone(),
                events: events.clone(),
                ids,
                head: item.head,
                devices: self.seq.devices(),
            });
            item.publication = Some(Arc::new(Publication::new(
                self.core.key.clone(),
                self.core.epoch,
                events,
            )));
        }
        item.oversold = self.seq.oversold();
        item.open_conflicts = self.seq.open_conflicts();
        self.ctx.committer.send(item).await;
    }

    fn forget_committed(&mut self) {
        let committed = self.core.committed();
        while self.uncommitted.front().is_some_and(|p| p.seq <= committed) {
            if let Some(p) = self.uncommitted.pop_front() {
                self.uncommitted_ids.remove(&p.event_id);
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd, round: &mut Round) {
        match cmd {
            Cmd::Publish {
                publish,
                origin,
                moved,
                reply,
            } => {
                let mut lookups = Prefetched {
                    known: Some(self.known_id(&publish.event_id).await),
                    moved: match (&publish.body, moved) {
                        (EventBody::StockCounted(c), Some(pre)) => Some(
                            self.moved_since(&c.sku, publish.base_seq.unwrap_or(0), pre)
                                .await,
                        ),
                        _ => None,
                    },
                    health: &self.ctx.health,
                };
                let outcome =
                    self.seq
                        .publish(*publish, &origin.device, origin.offset_ms, &mut lookups);
                let answer = match outcome {
                    Outcome::Sequenced(sequenced, answer) => match self.append(*sequenced, round) {
                        Ok(()) => answer,
                        Err(code) => failed_answer(answer, code),
                    },
                    Outcome::Answered(answer, record) => {
                        if let Some(record) = record
                            && let Err(code) =
                                self.write_changes(vec![Change::Conflict(record)], round)
                        {
                            failed_answer(answer, code)
                        } else {
                            answer
                        }
                    }
                };
                round
                    .item
                    .replies
                    .push(reply_with(reply, answer, failed_answer));
            }
            Cmd::Resolve {
                id,
                request,
                admin,
                reply,
            } => {
                let recorded = self.recorded(id).await;
                let result = self
                    .seq
                    .resolve(&id, &request, &admin, self.ctx.health.writable(), |_| {
                        recorded
                    })
                    .and_then(|(sequenced, response)| {
                        self.append(*sequenced, round)
                            .map(|()| response)
                            .map_err(|code| Rejected::bare(code, code_message(code)))
                    });
                round
                    .item
                    .replies
                    .push(reply_with(reply, result, |_, code| {
                        Err(Rejected::bare(code, code_message(code)))
                    }));
            }
            Cmd::Snapshot { reply } => {
                // Answered after the commit that makes the head durable: a snapshot never shows
                // an effect a crash could take back.
                let result = if self.ctx.health.failed() {
                    Err(ErrorCode::StorageUnavailable)
                } else {
                    Ok(self.seq.snapshot())
                };
                round
                    .item
                    .replies
                    .push(reply_with(reply, result, |_, code| Err(code)));
            }
        }
    }

    /// The seq and hash of `event_id` if the branch accepted it: from memory for events not
    /// yet durable, from the store only when the filter cannot rule it out.
    async fn known_id(&self, event_id: &Uuid) -> Result<Option<(u64, u64)>, Refused> {
        if let Some(found) = self.uncommitted_ids.get(event_id) {
            return Ok(Some(*found));
        }
        if !self.known.may_contain(event_id) {
            return Ok(None);
        }
        let (log, key, id) = (self.ctx.log.clone(), self.core.key.clone(), *event_id);
        blocking(move || {
            log.dedup(&key, &id)
                .map(|d| d.map(|d| (d.seq, d.hash)))
                .map_err(|e| unreadable(&e))
        })
        .await
    }

    /// The sum of `sku`'s movements after `base_seq` for a count sequenced now: `pre` (read
    /// when the count was submitted), what was committed since, and what is not yet durable.
    async fn moved_since(
        &self,
        sku: &Sku,
        base_seq: u64,
        pre: Result<Moved, Refused>,
    ) -> Result<i64, Refused> {
        let pre = pre?;
        let (head, floor) = (self.seq.head(), self.core.floor());
        if base_seq > head {
            return Err(Refused::new(
                ErrorCode::StaleBase,
                format!("base_seq {base_seq} is past the head {head}"),
            ));
        }
        if base_seq < floor {
            return Err(Refused::new(
                ErrorCode::StaleBase,
                format!(
                    "base_seq {base_seq} is below the floor {floor}: the movements since are trimmed; count again"
                ),
            ));
        }
        let committed = self.core.committed();
        let (log, key, s) = (self.ctx.log.clone(), self.core.key.clone(), sku.clone());
        let since = blocking(move || movements(&*log, &key, &s, pre.until, committed)).await?;
        let mut sum = pre.sum.saturating_add(since.sum);
        for p in self
            .uncommitted
            .iter()
            .filter(|p| p.seq > committed.max(pre.until))
        {
            sum = sum.saturating_add(sku_delta(&p.bytes, sku)?);
        }
        Ok(sum)
    }

    /// Whether conflict `id` was ever recorded (a resolution of one not open in memory).
    async fn recorded(&self, id: Uuid) -> Result<bool, Refused> {
        let (log, key) = (self.ctx.log.clone(), self.core.key.clone());
        blocking(move || {
            log.conflict(&key, &id)
                .map(|c| c.is_some())
                .map_err(|e| unreadable(&e))
        })
        .await
    }

    /// Adds a sequenced event and its state changes to the round. The state has already
    /// changed: if anything here fails, the branch is poisoned.
    fn append(&mut self, sequenced: Sequenced, round: &mut Round) -> Result<(), ErrorCode> {
        let Sequenced {
            stored,
            event_id,
            hash,
            changes,
            device_seq,
        } = sequenced;
        self.write_changes(changes, round)?;
        round.ids.push((event_id, hash));
        self.uncommitted_ids.insert(event_id, (stored.seq, hash));
        self.known.insert(&event_id);
        self.uncommitted.push_back(Pending {
            seq: stored.seq,
            event_id,
            bytes: stored.bytes.clone(),
        });
        round.bytes += stored.bytes.len();
        round.events.push(stored);
        if let Some((device, seq)) = device_seq {
            let seqs = &mut round.item.device_seqs;
            match seqs.iter_mut().find(|(d, _)| *d == device) {
                Some(entry) => entry.1 = seq,
                None => seqs.push((device, seq)),
            }
        }
        Ok(())
    }

    /// Turns state changes into store ops in the round; poisons the branch if they cannot be
    /// encoded.
    fn write_changes(&mut self, changes: Vec<Change>, round: &mut Round) -> Result<(), ErrorCode> {
        match changes_ops(&self.core.key, changes) {
            Ok(ops) => {
                round.item.ops.extend(ops);
                Ok(())
            }
            Err(code) => {
                self.seq.poison();
                Err(code)
            }
        }
    }
}

/// Turns state changes into store ops.
fn changes_ops(branch: &Arc<BranchKey>, changes: Vec<Change>) -> Result<Vec<Op>, ErrorCode> {
    fn encode<T: Serialize>(value: &T) -> Result<bytes::Bytes, ErrorCode> {
        branchline_protocol::Codec::MsgPack
            .encode(value)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot encode branch state");
                ErrorCode::Internal
            })
    }
    let mut ops = Vec::with_capacity(changes.len());
    for change in changes {
        ops.push(match change {
            Change::Stock(sku, on_hand) => Op::Stock {
                branch: branch.clone(),
                sku,
                on_hand,
            },
            Change::Product(sku, state) => Op::Product {
                branch: branch.clone(),
                sku,
                state: encode(&*state)?,
            },
            Change::Conflict(record) => Op::Conflict {
                branch: branch.clone(),
                id: record.id,
                record: encode(&*record)?,
            },
        });
    }
    Ok(ops)
}

/// A reply that sends `result` after a durable commit, or what `on_failure` makes of it when
/// the commit failed.
fn reply_with<T: Send + 'static>(
    reply: oneshot::Sender<T>,
    result: T,
    on_failure: impl FnOnce(T, ErrorCode) -> T + Send + 'static,
) -> Reply {
    Box::new(move |commit: Result<(), ErrorCode>| {
        let out = match commit {
            Ok(()) => result,
            Err(code) => on_failure(result, code),
        };
        let _ = reply.send(out);
    })
}
