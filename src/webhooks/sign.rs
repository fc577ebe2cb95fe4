//! Signatures of the callbacks, so receivers can tell they come from tallyd.
//!
//! - Usage trigger callbacks carry `X-Twilio-Signature` computed exactly as
//!   Twilio computes it, with the account's auth token: receivers keep
//!   validating with Twilio's own helper libraries (`RequestValidator`)
//!   unchanged. The signed text is the full URL the request is sent to, then,
//!   for a POST, every form parameter sorted by name (and, for a repeated name,
//!   by value), each name immediately followed by its value.
//! - Wallet events carry `X-Tallyd-Signature: sha256=<hex>`, the HMAC-SHA256
//!   of the exact body bytes under the account's webhook secret (the
//!   common scheme of JSON webhooks: the receiver hashes the raw body it read).

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};

/// The header of a usage trigger callback's signature.
pub const TWILIO_SIGNATURE: &str = "X-Twilio-Signature";
/// The header carrying the idempotency token (the outbox row's id), as
/// Twilio names it.
pub const TWILIO_IDEMPOTENCY_TOKEN: &str = "I-Twilio-Idempotency-Token";
/// The header of a wallet event's signature.
pub const TALLYD_SIGNATURE: &str = "X-Tallyd-Signature";
/// The header carrying a wallet event's id (its idempotency token).
pub const TALLYD_EVENT_ID: &str = "X-Tallyd-Event-Id";

/// The text Twilio signs: `url`, then for a POST each `(name, value)` of
/// `params` in order of name then value, concatenated. A GET passes no
/// params (they are in `url`'s query).
pub fn twilio_signed_text(url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    // Byte order of UTF-8 is code point order, the order Twilio's libraries sort by.
    sorted.sort();
    sorted.dedup();
    let mut s = String::with_capacity(url.len() + params.len() * 32);
    s.push_str(url);
    for (k, v) in sorted {
        s.push_str(k);
        s.push_str(v);
    }
    s
}

/// `X-Twilio-Signature`: base64 of HMAC-SHA1(auth token, [`twilio_signed_text`]).
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(twilio_signed_text(url, params).as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `X-Tallyd-Signature`: `sha256=` and the hex HMAC-SHA256(secret, body).
pub fn tallyd_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + digest.len() * 2);
    out.push_str("sha256=");
    for b in digest.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The worked example of Twilio's security documentation (its auth token,
    /// URL, parameters and published signature).
    #[test]
    fn twilio_documented_example() {
        let params = p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]);
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            twilio_signature("12345", url, &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        // Order of the given parameters does not matter; the signed text sorts.
        let mut reversed = params.clone();
        reversed.reverse();
        assert_eq!(
            twilio_signature("12345", url, &reversed),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        assert_ne!(
            twilio_signature("54321", url, &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
    }

    #[test]
    fn signed_text_sorts_names_then_values() {
        let params = p(&[("b", "2"), ("a", "9"), ("a", "1"), ("B", "x")]);
        assert_eq!(twilio_signed_text("u", &params), "uBxa1a9b2");
        assert_eq!(
            twilio_signed_text("https://h/x?a=1", &[]),
            "https://h/x?a=1"
        );
    }

    /// RFC 4231 test case 2 for HMAC-SHA-256.
    #[test]
    fn tallyd_signature_is_hmac_sha256_hex() {
        assert_eq!(
            tallyd_signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
