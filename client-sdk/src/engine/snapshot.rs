//! Snapshot downloads (PROTOCOL.md §11): a branch the hub cannot resume is rebuilt from a
//! paged snapshot, held in memory until complete.

use std::sync::Arc;

use branchline_protocol::{ErrorCode, Name};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::time::sleep;

use super::shared::Shared;
use crate::error::{Error, Result};
use crate::http::Snapshot;
use crate::status::{ClientEvent, SnapshotProgress, SyncState};

/// A whole snapshot of a branch, or the error (a refused token) that stopped it.
pub(crate) type SnapshotFuture = BoxFuture<'static, (Name, Result<Snapshot>)>;

/// Downloads a whole snapshot, retrying network failures with backoff; progress goes to the
/// status watch. Pages are added to the branch's entry in [`Shared::downloads`] as they
/// come, so a download that is cut (this future dropped with its connection, or a request
/// failing) resumes from the last page token; only an expired token (410
/// `snapshot_expired`) starts it over.
pub(crate) fn download(shared: Arc<Shared>, branch: Name) -> SnapshotFuture {
    async move {
        let progress = |(received, total): (u64, u64)| {
            let branch = branch.clone();
            shared.status.send_modify(|s| {
                s.state = SyncState::Resyncing;
                s.snapshot = Some(SnapshotProgress {
                    branch,
                    received,
                    total,
                });
            });
        };
        let downloads = &shared.downloads;
        let mut attempt = 0;
        loop {
            let (token, counts) =
                downloads.with(&branch, |d| (d.next_page.clone(), (d.received, d.total)));
            progress(counts);
            match shared
                .http
                .snapshot_page(&branch, token.as_deref(), shared.opts.snapshot_page)
                .await
            {
                Ok(page) => {
                    attempt = 0;
                    let (done, counts) = downloads.with(&branch, |d| {
                        d.add(page);
                        (d.is_complete(), (d.received, d.total))
                    });
                    progress(counts);
                    if done {
                        let snap = downloads.take(&branch).unwrap_or_default();
                        return (branch.clone(), Ok(snap));
                    }
                }
                Err(Error::Hub {
                    code: ErrorCode::SnapshotExpired,
                    ..
                }) => {
                    tracing::info!(%branch, "snapshot page token expired; starting over");
                    downloads.take(&branch);
                }
                Err(e) if e.is_auth() => return (branch.clone(), Err(e)),
                Err(e) => {
                    attempt += 1;
                    shared.notify(ClientEvent::Error {
                        message: format!("snapshot of {branch}: {e}"),
                    });
                    sleep(shared.opts.backoff.delay(attempt)).await;
                }
            }
        }
    }
    .boxed()
}
