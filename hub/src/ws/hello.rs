//! The first frame: a `hello`, read within the deadline and checked (protocol version,
//! token, tenant, device, branches); and how a session ends with an error frame and a close
//! code.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message};
use branchline_protocol::{
    ClientFrame, CloseCode, Codec, ErrorCode, ErrorFrame, Hello, ServerFrame, Subscription, now_ms,
};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite;

use super::Socket;
use super::frames::encode;
use crate::auth::{Access, Claims};
use crate::hub::Hub;

/// How long a closing session waits for the client's close frame.
pub const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A fatal error: sent as an `error` frame, then the matching close code.
pub struct Fatal {
    pub code: ErrorCode,
    pub message: String,
}

impl Fatal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A session whose hello was accepted.
pub struct Greeted<S> {
    pub ws: S,
    pub claims: Claims,
    pub subscriptions: Vec<Subscription>,
    pub offset_ms: i64,
}

impl<S> Greeted<S> {
    /// The tracing span the session runs in. A debug span: at the default log level it costs
    /// nothing, where an enabled span is entered and left on every poll of every session.
    pub fn span(&self, codec: Codec) -> tracing::Span {
        let branches: Vec<&str> = self
            .subscriptions
            .iter()
            .map(|s| s.branch.as_str())
            .collect();
        tracing::debug_span!(
            "session",
            tenant = %self.claims.tenant,
            device = %self.claims.device,
            role = ?self.claims.role,
            branches = %branches.join(","),
            codec = ?codec,
        )
    }
}

/// Reads and checks the hello; closes the socket with the right code if it is refused.
pub async fn greet<S: Socket>(mut ws: S, codec: Codec, hub: Arc<Hub>) -> Option<Greeted<S>> {
    let hello = match read_hello(&mut ws, codec, &hub).await {
        Some(Ok(hello)) => hello,
        Some(Err(fatal)) => {
            tracing::debug!(code = %fatal.code, message = %fatal.message, "hello refused");
            close(&mut ws, codec, &fatal, false).await;
            return None;
        }
        None => return None,
    };
    // Saturating: the client's time is whatever it says.
    let offset_ms = now_ms().saturating_sub(hello.client_time_ms);
    match admit(&hub, &hello) {
        Ok(claims) => Some(Greeted {
            ws,
            claims,
            subscriptions: hello.subscriptions,
            offset_ms,
        }),
        Err(fatal) => {
            tracing::debug!(code = %fatal.code, message = %fatal.message, "hello refused");
            close(&mut ws, codec, &fatal, false).await;
            None
        }
    }
}

/// Reads the first frame, which must be a `hello`; `None` if the client went away.
async fn read_hello<S: Socket>(
    ws: &mut S,
    codec: Codec,
    hub: &Hub,
) -> Option<Result<Hello, Fatal>> {
    let deadline = tokio::time::sleep(hub.config().limits.hello_timeout);
    tokio::pin!(deadline);
    loop {
        let msg = tokio::select! {
            _ = &mut deadline => {
                return Some(Err(Fatal::new(ErrorCode::BadHello, "no hello within the deadline")));
            }
            _ = hub.shutdown().cancelled() => {
                return Some(Err(Fatal::new(ErrorCode::ShuttingDown, "the hub is shutting down")));
            }
            msg = ws.next() => msg,
        };
        let bytes = match msg? {
            Ok(Message::Binary(b)) if codec == Codec::MsgPack => b,
            Ok(Message::Text(t)) if codec == Codec::Json => bytes::Bytes::from(t),
            Ok(Message::Binary(_) | Message::Text(_)) => {
                return Some(Err(Fatal::new(
                    ErrorCode::BadHello,
                    wrong_message_kind(codec),
                )));
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) => return None,
            Err(e) => return too_big(&e).map(Err),
        };
        return Some(match codec.decode_client_frame(&bytes) {
            Ok(ClientFrame::Hello(hello)) => Ok(hello),
            Ok(other) => Err(Fatal::new(
                ErrorCode::BadHello,
                format!("the first frame must be a hello, not {}", other.type_name()),
            )),
            Err(e) => Err(Fatal::new(
                ErrorCode::BadHello,
                format!("the hello does not decode: {e}"),
            )),
        });
    }
}

/// `Some(message_too_big)` if a read failed because the frame was over the limit.
pub fn too_big(e: &axum::Error) -> Option<Fatal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(cap)) = err.downcast_ref::<tungstenite::Error>() {
            return Some(Fatal::new(ErrorCode::MessageTooBig, cap.to_string()));
        }
        source = err.source();
    }
    None
}

pub fn wrong_message_kind(codec: Codec) -> String {
    match codec {
        Codec::MsgPack => "this session speaks MessagePack: send binary messages".into(),
        Codec::Json => "this session speaks JSON: send text messages".into(),
    }
}

/// Checks version, token, tenant, device and branches of a hello.
fn admit(hub: &Hub, hello: &Hello) -> Result<Claims, Fatal> {
    branchline_protocol::check_version(hello.protocol)
        .map_err(|m| Fatal::new(ErrorCode::UnsupportedVersion, m))?;
    let claims = hub
        .keys()
        .verify(&hello.token)
        .map_err(|e| Fatal::new(e.code(), e.to_string()))?;
    if claims.tenant != hello.tenant {
        return Err(Fatal::new(
            ErrorCode::Forbidden,
            format!("the token is for tenant {}", claims.tenant),
        ));
    }
    if claims.device != hello.device {
        return Err(Fatal::new(
            ErrorCode::Forbidden,
            format!("the token is for device {}", claims.device),
        ));
    }
    for sub in &hello.subscriptions {
        claims
            .check_branch(&hello.tenant, &sub.branch)
            .map_err(|e| Fatal::new(e.code(), e.to_string()))?;
    }
    Ok(claims)
}

/// Sends an `error` frame and a close frame, best effort and bounded: a client that reads
/// nothing gets neither and is dropped after [`CLOSE_WAIT`].
pub async fn close<S: Socket>(ws: &mut S, codec: Codec, fatal: &Fatal, after_hello: bool) {
    let frame = ServerFrame::Error(ErrorFrame {
        code: fatal.code,
        message: fatal.message.clone(),
        fatal: true,
    });
    let mut reason = fatal.message.clone();
    // A close reason is at most 123 bytes.
    while reason.len() > 120 {
        reason.pop();
    }
    let close = CloseFrame {
        code: CloseCode::for_error(fatal.code, after_hello).as_u16(),
        reason: reason.into(),
    };
    let sent = tokio::time::timeout(CLOSE_WAIT, async {
        if let Some(msg) = encode(codec, &frame) {
            ws.feed(msg).await?;
        }
        ws.feed(Message::Close(Some(close))).await?;
        ws.flush().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    // Finish the closing handshake: wait (briefly) for the client's close before dropping the
    // connection. Dropping at once can reset it while the client still has our error and close
    // frames unread, and they would be lost.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = ws.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}
