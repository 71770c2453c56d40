//! A failed disk write or flush acknowledges nothing (guarantee 2): the publishes it carried
//! are refused, nothing of them is ever shown, reads keep working, and writes stay refused
//! until a restart.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use branchline_hub::engine::sled::StoreError;
use branchline_hub::protocol::http::EventsPage;
use branchline_hub::protocol::*;
use branchline_hub::test_util::{StoreHooks, TestHub};
use support::*;

/// A disk whose writes or flushes fail while `fail` is set (full, or failing).
struct Faulty {
    fail: Arc<AtomicBool>,
    fault: Fault,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Write,
    Flush,
}

impl Faulty {
    fn check(&self, at: Fault) -> Result<(), StoreError> {
        if self.fault == at && self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Disk(std::io::Error::other(
                "injected: no space left on device",
            )));
        }
        Ok(())
    }
}

impl StoreHooks for Faulty {
    fn before_apply(&self) -> Result<(), StoreError> {
        self.check(Fault::Write)
    }
    fn before_flush(&self) -> Result<(), StoreError> {
        self.check(Fault::Flush)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_acknowledges_nothing_and_reads_keep_working() {
    failure_acknowledges_nothing(Fault::Write).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_acknowledges_nothing_and_reads_keep_working() {
    failure_acknowledges_nothing(Fault::Flush).await;
}

async fn failure_acknowledges_nothing(fault: Fault) {
    let fail = Arc::new(AtomicBool::new(false));
    let hub = TestHub::start_hooked(Faulty {
        fail: fail.clone(),
        fault,
    })
    .await;
    let token = hub.token("acme", &["b1"], "till-1", Role::Cashier);
    let mut follower = connect(&hub, Codec::MsgPack).await;
    let admin = hub.token("acme", &["*"], "console", Role::Admin);
    follower
        .hello(
            &admin,
            "acme",
            "console",
            vec![Subscription {
                branch: name("b1"),
                from: None,
            }],
        )
        .await;
    let mut till = connect(&hub, Codec::MsgPack).await;
    till.hello(&token, "acme", "till-1", vec![]).await;
    for i in 1..=3 {
        till.publish(publish("b1", i, note(i))).await.unwrap();
    }

    fail.store(true, Ordering::SeqCst);
    let mut refused = Vec::new();
    for i in 4..=5 {
        let p = publish("b1", i, note(i));
        refused.push(p.clone());
        let rejection = till.publish(p).await.unwrap_err();
        assert_eq!(rejection.code, ErrorCode::StorageUnavailable);
    }
    // The failure is sticky: the disk "recovers", but nothing more is written until a restart.
    fail.store(false, Ordering::SeqCst);
    assert_eq!(
        till.publish(publish("b1", 4, note(4)))
            .await
            .unwrap_err()
            .code,
        ErrorCode::StorageUnavailable
    );

    let http = reqwest::Client::new();
    let ready = http
        .get(format!("{}/readyz", hub.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let page: EventsPage = http
        .get(format!(
            "{}/v1/branches/acme/b1/events?after=0",
            hub.http_url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_contiguous(&page.events, 1, 3);
    assert_eq!(page.head, 3, "refused events are never visible");
    let metrics = http
        .get(format!("{}/metrics", hub.http_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("branchline_store_errors_total 1"),
        "{metrics}"
    );

    // The follower saw exactly the three durable events: the next frame after them is the
    // answer to a ping.
    let seen = follower.events_through("b1", 3).await;
    assert_contiguous(&seen, 1, 3);
    follower
        .send(&ClientFrame::Ping(Ping {
            nonce: 5,
            client_time_ms: now_ms(),
        }))
        .await;
    let next = follower.until(|f| match f {
        ServerFrame::Event(_) | ServerFrame::Events(_) | ServerFrame::Pong(_) => Some(f.clone()),
        _ => None,
    });
    assert!(
        matches!(next.await, ServerFrame::Pong(_)),
        "nothing of the failed commit reached a follower"
    );

    drop((till, follower));

    // After a restart the store holds everything acknowledged. A write that failed left
    // nothing; a flush that failed may or may not have reached the disk (the event was never
    // acknowledged nor shown, as after a crash). Either way, retrying the refused event
    // applies it exactly once, and the device goes on from there.
    let hub = hub.restart().await;
    let mut till = connect(&hub, Codec::MsgPack).await;
    let live = vec![Subscription {
        branch: name("b1"),
        from: None,
    }];
    let welcome = till.hello(&token, "acme", "till-1", live).await;
    let start = &welcome.branches[0];
    match fault {
        Fault::Write => assert_eq!((start.head, start.last_device_seq), (3, 3)),
        Fault::Flush => assert!(
            [(3, 3), (4, 4)].contains(&(start.head, start.last_device_seq)),
            "{start:?}"
        ),
    }
    let retried = till.publish(refused[0].clone()).await.unwrap();
    assert_eq!((retried.seq, retried.duplicate), (4, start.head == 4));
    let next = till
        .publish(Publish {
            device_seq: 5,
            ..refused[1].clone()
        })
        .await
        .unwrap();
    assert_eq!((next.seq, next.duplicate), (5, false));
    hub.stop().await;
}
