//! `cdr::decode` on arbitrary bytes: it must answer with a CDR that keeps docs/contract.md §1
//! or a rejection that names a reason (and the field at fault, in its message),
//! never panic or overflow, and its fast path must agree with the serde_json path
//! on every input (same CDR, or same reason, field and message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tallyd::cdr::{decode, decode_with_serde_json, RejectReason, Usage};

fuzz_target!(|data: &[u8]| {
    let fast = decode(data);
    match &fast {
        Ok(cdr) => {
            // Only a UTF-8 JSON object is ever counted, however the bytes are read.
            assert!(std::str::from_utf8(data).is_ok(), "accepted non-UTF-8");
            assert!((1..=64).contains(&cdr.id.chars().count()));
            match cdr.usage {
                Usage::Call {
                    duration, billsec, ..
                } => assert!(billsec <= duration),
                Usage::Message { segments, .. } => assert!(segments >= 1),
            }
        }
        Err(r) => {
            assert!(!r.message.is_empty());
            assert!(!r.reason.as_str().is_empty());
            let structural = matches!(
                r.reason,
                RejectReason::InvalidJson | RejectReason::NotAnObject
            );
            assert_eq!(r.field.is_none(), structural, "{r:?}");
            if let Some(field) = r.field {
                assert!(r.message.contains(field), "{r:?}");
            }
        }
    }
    assert_eq!(fast, decode_with_serde_json(data));
});
