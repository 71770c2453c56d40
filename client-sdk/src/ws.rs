//! The WebSocket transport: connect with the subprotocol, and turn WebSocket messages into
//! protocol frames and back. The session logic above it sees only a
//! `Sink<ClientFrame>` and a `Stream<Item = Result<ServerFrame>>`, so it can be driven by
//! in-memory channels in tests.

use std::pin::Pin;
use std::time::Duration;

use branchline_protocol::{ClientFrame, Codec, ErrorCode, ServerFrame};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::error::{Error, Result};

/// Frames to the hub.
pub(crate) type FrameSink = Pin<Box<dyn Sink<ClientFrame, Error = Error> + Send>>;
/// Frames from the hub; the stream ends when the connection closes.
pub(crate) type FrameStream = Pin<Box<dyn Stream<Item = Result<ServerFrame>> + Send>>;

/// Opens a WebSocket to `url` offering `codec`'s subprotocol; returns the encoding the hub
/// selected with the two halves. An HTTP refusal of the upgrade becomes [`Error::Hub`] with
/// the problem's code (PROTOCOL.md §4).
pub(crate) async fn connect(
    url: &str,
    codec: Codec,
    max_frame: usize,
) -> Result<(FrameSink, FrameStream, Codec)> {
    let mut req = url
        .into_client_request()
        .map_err(|e| Error::Config(format!("bad WebSocket URL {url}: {e}")))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(codec.subprotocol()),
    );
    // Small buffers: a till holds one connection and frames are small; the default 128 KiB
    // read buffer is wasted memory on an embedded device.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(max_frame.max(1 << 20) * 4))
        .max_frame_size(Some(max_frame.max(1 << 20) * 4));
    let (ws, resp) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
        .await
        .map_err(upgrade_error)?;
    let selected = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(Codec::from_subprotocol)
        // PROTOCOL.md §4: a hub that selects nothing speaks MessagePack.
        .unwrap_or(Codec::MsgPack);
    let (sink, stream) = ws.split();
    let sink =
        sink.sink_map_err(|e| Error::Network(e.to_string()))
            .with(move |frame: ClientFrame| {
                let msg = selected.encode(&frame).map(|bytes| {
                    if selected.is_binary() {
                        Message::Binary(bytes)
                    } else {
                        Message::Text(String::from_utf8_lossy(&bytes).into_owned().into())
                    }
                });
                futures::future::ready(msg.map_err(Error::from))
            });
    let stream = stream.filter_map(move |msg| {
        futures::future::ready(match msg {
            Ok(Message::Binary(b)) => Some(selected.decode_server_frame(&b).map_err(Error::from)),
            Ok(Message::Text(t)) => Some(
                selected
                    .decode_server_frame(t.as_bytes())
                    .map_err(Error::from),
            ),
            Ok(Message::Close(frame)) => Some(Err(Error::Network(match frame {
                Some(f) => format!("closed by the hub: {} {}", u16::from(f.code), f.reason),
                None => "closed by the hub".into(),
            }))),
            // Pings are answered by tungstenite itself; pongs and raw frames carry nothing.
            Ok(_) => None,
            Err(e) => Some(Err(Error::Network(e.to_string()))),
        })
    });
    Ok((Box::pin(sink), Box::pin(stream), selected))
}

fn upgrade_error(e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().unwrap_or_default();
            let problem = Codec::Json
                .decode::<branchline_protocol::http::Problem>(body)
                .or_else(|_| Codec::MsgPack.decode(body));
            match problem {
                Ok(p) => Error::Hub {
                    status,
                    code: p.code,
                    message: p.message,
                },
                Err(_) => Error::Hub {
                    status,
                    code: if status == 503 {
                        ErrorCode::Overloaded
                    } else {
                        ErrorCode::Internal
                    },
                    message: format!("WebSocket upgrade refused with HTTP {status}"),
                },
            }
        }
        other => Error::Network(other.to_string()),
    }
}

/// Waits for the next frame, at most `limit`.
pub(crate) async fn next_frame(stream: &mut FrameStream, limit: Duration) -> Result<ServerFrame> {
    match tokio::time::timeout(limit, stream.next()).await {
        Ok(Some(frame)) => frame,
        Ok(None) => Err(Error::Network("connection closed".into())),
        Err(_) => Err(Error::Network(format!("no answer within {limit:?}"))),
    }
}
