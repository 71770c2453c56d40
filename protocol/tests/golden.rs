//! Golden encodings: one fixed JSON and MessagePack encoding per frame and HTTP body, kept in
//! `tests/golden/`, so that any change to the wire format is deliberate.
//!
//! After an intended change, rewrite the files with
//! `BRANCHLINE_BLESS=1 cargo test -p branchline-protocol --test golden` and review the diff.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use branchline_protocol::{ClientFrame, Codec, EventKind, ServerFrame};
use support::{Encoded, client_frames, event_samples, http_bodies, publish_samples, server_frames};

fn golden_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for line in bytes.chunks(32) {
        for b in line {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('\n');
    }
    out
}

fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Compares (or, when blessing, writes) one golden pair; returns what differed.
fn check(name: &str, json: &[u8], msgpack: &[u8]) -> Vec<String> {
    let json_file = golden_path(&format!("{name}.json"));
    let msgpack_file = golden_path(&format!("{name}.msgpack.hex"));
    let json_text = format!("{}\n", std::str::from_utf8(json).unwrap());
    if std::env::var_os("BRANCHLINE_BLESS").is_some() {
        std::fs::write(&json_file, &json_text).unwrap();
        std::fs::write(&msgpack_file, hex(msgpack)).unwrap();
        return Vec::new();
    }
    let mut failures = Vec::new();
    match std::fs::read_to_string(&json_file) {
        Ok(stored) if stored == json_text => {}
        Ok(stored) => failures.push(format!(
            "{name}.json differs:\n  stored {stored}  now    {json_text}"
        )),
        Err(e) => failures.push(format!("{name}.json: {e}")),
    }
    match std::fs::read_to_string(&msgpack_file) {
        Ok(stored) if unhex(&stored) == msgpack => {}
        Ok(_) => failures.push(format!("{name}.msgpack.hex differs")),
        Err(e) => failures.push(format!("{name}.msgpack.hex: {e}")),
    }
    failures
}

fn assert_all(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "wire format changed (rerun with BRANCHLINE_BLESS=1 if intended):\n{}",
        failures.join("\n")
    );
}

/// Checks client frames against their golden files, and that the stored bytes decode to
/// them in both codecs.
fn check_client_frames(samples: Vec<(String, ClientFrame)>) {
    let mut failures = Vec::new();
    for (name, frame) in samples {
        let json = Codec::Json.encode(&frame).unwrap();
        let msgpack = Codec::MsgPack.encode(&frame).unwrap();
        failures.extend(check(&name, &json, &msgpack));
        let stored =
            unhex(&std::fs::read_to_string(golden_path(&format!("{name}.msgpack.hex"))).unwrap());
        assert_eq!(
            Codec::MsgPack.decode_client_frame(&stored).unwrap(),
            frame,
            "{name}"
        );
        let stored = std::fs::read(golden_path(&format!("{name}.json"))).unwrap();
        assert_eq!(
            Codec::Json
                .decode_client_frame(stored.trim_ascii_end())
                .unwrap(),
            frame,
            "{name}"
        );
    }
    assert_all(&failures);
}

/// As [`check_client_frames`], for hub frames.
fn check_server_frames(samples: Vec<(String, ServerFrame)>) {
    let mut failures = Vec::new();
    for (name, frame) in samples {
        let json = Codec::Json.encode(&frame).unwrap();
        let msgpack = Codec::MsgPack.encode(&frame).unwrap();
        failures.extend(check(&name, &json, &msgpack));
        let stored =
            unhex(&std::fs::read_to_string(golden_path(&format!("{name}.msgpack.hex"))).unwrap());
        assert_eq!(
            Codec::MsgPack.decode_server_frame(&stored).unwrap(),
            frame,
            "{name}"
        );
        let stored = std::fs::read(golden_path(&format!("{name}.json"))).unwrap();
        assert_eq!(
            Codec::Json
                .decode_server_frame(stored.trim_ascii_end())
                .unwrap(),
            frame,
            "{name}"
        );
    }
    assert_all(&failures);
}

#[test]
fn client_frames_match_their_golden_encodings() {
    check_client_frames(
        client_frames()
            .into_iter()
            .map(|(ty, f)| (format!("client_{ty}"), f))
            .collect(),
    );
}

#[test]
fn server_frames_match_their_golden_encodings() {
    check_server_frames(
        server_frames()
            .into_iter()
            .map(|(ty, f)| (format!("server_{ty}"), f))
            .collect(),
    );
}

#[test]
fn event_kinds_match_their_golden_encodings() {
    check_client_frames(
        publish_samples()
            .into_iter()
            .map(|(name, f)| (name.to_string(), f))
            .collect(),
    );
    check_server_frames(
        event_samples()
            .into_iter()
            .map(|(name, f)| (name.to_string(), f))
            .collect(),
    );
}

#[test]
fn every_event_kind_has_a_golden_sample() {
    let mut kinds = BTreeSet::new();
    let publishes = client_frames().into_iter().chain(publish_samples());
    for (_, frame) in publishes {
        if let ClientFrame::Publish(p) = frame {
            kinds.insert(p.body.kind().as_str());
        }
    }
    for (_, frame) in server_frames().into_iter().chain(event_samples()) {
        if let ServerFrame::Event(e) = frame {
            kinds.insert(e.body.kind().as_str());
        }
    }
    let all: BTreeSet<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, all);
}

#[test]
fn http_bodies_match_their_golden_encodings() {
    let bodies: Vec<Encoded> = http_bodies();
    let failures: Vec<String> = bodies
        .iter()
        .flat_map(|(name, json, msgpack)| check(name, json, msgpack))
        .collect();
    assert_all(&failures);
}

#[test]
fn every_frame_type_has_a_sample() {
    let client: Vec<&str> = client_frames()
        .iter()
        .map(|(t, f)| {
            assert_eq!(*t, f.type_name());
            *t
        })
        .collect();
    assert_eq!(client, ClientFrame::TYPES);
    let server: Vec<&str> = server_frames()
        .iter()
        .map(|(t, f)| {
            assert_eq!(*t, f.type_name());
            *t
        })
        .collect();
    assert_eq!(server, ServerFrame::TYPES);
}
