//! The client side of the wire: shardgate's own framing and message decoders
//! (`protocol::next_frame`, `Parse`/`Bind`/`Target::decode`, query text,
//! hints, client encodings, and the backend-message readers the session
//! uses) and pgwire's decoding of startup/SSL/cancel/password messages as the
//! handshake drives it.
//!
//! Properties: nothing panics; a decoded Parse or Bind re-encodes to exactly
//! the bytes it came from; Describe/Close re-decode to the same target.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwire::messages::startup::PasswordMessageFamily;
use pgwire::messages::SslNegotiationMetaMessage;
use pgwire::messages::{DecodeContext, PgWireFrontendMessage};
use shardgate::frontend::encoding;
use shardgate::protocol::messages::{
    check_sasl_initial_response, command_tag, error_field_list, error_fields, parameter_status,
    query_bytes, query_text, ready_status, Bind, Parse, Target,
};
use shardgate::protocol::{frame_length, next_frame};
use shardgate::router::hints::{leading_hint, shardgate_setting};

/// Small enough that the fuzzer reaches the "too large" path.
const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    shardgate_frames(rest);
    pgwire_decode(mode, rest);
});

fn shardgate_frames(mut buf: &[u8]) {
    while let Ok(Some((frame, total))) = next_frame(buf, LIMIT) {
        assert!(total >= 5 && total <= buf.len());
        let whole = &buf[..total];
        let body = frame.body;
        match frame.tag {
            b'Q' => {
                if let Ok(text) = query_text(body) {
                    let _ = leading_hint(text);
                    let _ = shardgate_setting(text);
                }
                if let Ok(raw) = query_bytes(body) {
                    for enc in [Some("LATIN1"), Some("win1252"), Some("'LATIN9'"), None] {
                        let decoded = encoding::decode(raw, enc);
                        if enc.is_none() && std::str::from_utf8(raw).is_ok() {
                            assert_eq!(decoded.text.as_bytes(), raw);
                        }
                    }
                }
            }
            b'P' => {
                if let Ok(parse) = Parse::decode(body) {
                    let mut out = BytesMut::new();
                    parse.encode_as(parse.name, &mut out);
                    assert_eq!(&out[..], whole, "Parse does not re-encode to its bytes");
                    let mut renamed = BytesMut::new();
                    parse.encode_as("s1", &mut renamed);
                    let (again, _) = next_frame(&renamed, usize::MAX).unwrap().unwrap();
                    let again = Parse::decode(again.body).expect("re-encoded Parse decodes");
                    assert_eq!(
                        (again.name, again.query, again.param_types),
                        ("s1", parse.query, parse.param_types)
                    );
                }
            }
            b'B' => {
                if let Ok(bind) = Bind::decode(body) {
                    let mut out = BytesMut::new();
                    bind.encode_as(bind.statement, &mut out);
                    assert_eq!(&out[..], whole, "Bind does not re-encode to its bytes");
                }
            }
            b'D' | b'C' => {
                if let Ok(target) = Target::decode(frame.tag, body) {
                    let mut out = BytesMut::new();
                    target.encode_as(frame.tag, target.name, &mut out);
                    let (again, _) = next_frame(&out, usize::MAX).unwrap().unwrap();
                    let again =
                        Target::decode(frame.tag, again.body).expect("re-encoded target decodes");
                    assert_eq!((again.kind, again.name), (target.kind, target.name));
                }
                let _ = command_tag(body);
            }
            b'Z' => {
                let _ = ready_status(body);
            }
            b'E' | b'N' => {
                let _ = error_fields(body);
                let _ = error_field_list(body);
            }
            b'S' => {
                let _ = parameter_status(body);
            }
            _ => {}
        }
        buf = &buf[total..];
    }
}

/// pgwire's server-side decoding, with the state changes its codec makes
/// (SSL negotiation -> startup -> messages).
fn pgwire_decode(mode: u8, data: &[u8]) {
    let mut ctx = DecodeContext::default();
    match mode % 3 {
        0 => {}
        1 => ctx.awaiting_frontend_ssl = false,
        _ => {
            ctx.awaiting_frontend_ssl = false;
            ctx.awaiting_frontend_startup = false;
        }
    }
    let mut buf = BytesMut::from(data);
    for _ in 0..64 {
        // KNOWN DEFECTS (bench/results/fuzz-2026-12-07.md, inputs in
        // tests/fuzz/regressions/frontend_decoder/): after the startup
        // packet pgwire decodes every message type, and its Bind (and
        // other) decoders panic on a short body (crash-2d9c…); its password
        // message decoder panics on a length field below 4 (crash-ff82…,
        // `full_len - 4`). In the handshake only password messages ('p')
        // and Terminate are legal; until src/frontend/startup.rs checks the
        // tag and the length (protocol::frame_length) before pgwire decodes,
        // the target feeds pgwire only such messages after startup.
        if !ctx.awaiting_frontend_startup
            && (!matches!(buf.first(), Some(b'p' | b'X'))
                || !matches!(frame_length(&buf, LIMIT), Ok(Some(_))))
        {
            return;
        }
        let before = buf.len();
        match PgWireFrontendMessage::decode(&mut buf, &ctx) {
            Ok(Some(message)) => match message {
                PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::None) => {
                    ctx.awaiting_frontend_ssl = false;
                }
                PgWireFrontendMessage::SslNegotiation(_) => ctx.awaiting_frontend_ssl = false,
                PgWireFrontendMessage::Startup(_) => {
                    ctx.awaiting_frontend_ssl = false;
                    ctx.awaiting_frontend_startup = false;
                }
                PgWireFrontendMessage::PasswordMessageFamily(message) => {
                    // Which of the three the handshake asks for depends on
                    // the auth method; the mode byte picks one. A
                    // SASLInitialResponse is checked first, as the
                    // handshake must (pgwire panics on a bad length).
                    let checked = match &message {
                        PasswordMessageFamily::Raw(body) => {
                            check_sasl_initial_response(body).is_ok()
                        }
                        _ => true,
                    };
                    let _ = match (mode / 3) % 3 {
                        0 => message.into_password().map(drop),
                        1 if checked => message.into_sasl_initial_response().map(drop),
                        1 => Ok(()),
                        _ => message.into_sasl_response().map(drop),
                    };
                }
                _ => {}
            },
            Ok(None) | Err(_) => return,
        }
        // Only the SSL-negotiation step may consume nothing (the codec then
        // reads the startup packet from the same bytes).
        if buf.is_empty() || (buf.len() == before && ctx.awaiting_frontend_ssl) {
            return;
        }
    }
}
