//! `cdr::decode` on arbitrary bytes: it must answer with a CDR or a rejection that
//! names a reason, never panic or overflow, and its fast path must agree with the
//! serde_json path on every input (same CDR, or same reason, field and message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tallyd::cdr::{decode, decode_with_serde_json};

fuzz_target!(|data: &[u8]| {
    let fast = decode(data);
    match &fast {
        Ok(cdr) => assert!(!cdr.id.is_empty()),
        Err(r) => {
            assert!(!r.message.is_empty());
            assert!(!r.reason.as_str().is_empty());
        }
    }
    assert_eq!(fast, decode_with_serde_json(data));
});
