//! The decoder's fast path: one pass over the bytes of a well-formed CDR, each
//! field read straight into its typed value.
//!
//! It only ever answers "this valid CDR" or "not sure" (`None`). Anything unusual —
//! a byte outside ASCII, an escape, a float or negative number in a field tallyd
//! reads, a duplicate field, a missing or invalid value, malformed JSON — is left
//! to the serde_json path, which then accepts or rejects with the reason. So the
//! fast path never has to produce an error message, and both paths accept exactly
//! the same messages.
//!
//! Why it is fast: no UTF-8 pass (strings are checked to be ASCII eight bytes at a
//! time while their end is searched for), no intermediate slots (a key is matched
//! once and its value parsed in place), and strings the CDR keeps are borrowed.

use std::borrow::Cow;

use super::{
    AccountSid, CallNumberType, CallStatus, Cdr, Direction, MessageKind, MessageNumberType, Mode,
    Usage,
};
use crate::calendar::parse_rfc3339_bytes;

/// Decodes a message if it is a valid CDR of the common shape; `None` otherwise.
pub(super) fn decode(b: &[u8]) -> Option<Cdr<'_>> {
    let mut p = Parser { b, i: 0 };
    let mut f = Fields::default();
    p.object(&mut f)?;
    f.finish()
}

/// Nesting depth of ignored values the fast path skips itself; deeper goes to serde_json.
const MAX_DEPTH: u32 = 8;

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// For 8 bytes read little-endian: a mask whose lowest set bit is the high bit of
/// the first byte that ends a plain ASCII run inside a JSON string — `"`, `\\`, a
/// control character (< 0x20) or a byte ≥ 0x80 — and 0 if there is none. (Bits
/// above the first hit may be spurious; the lowest one is exact.)
#[inline]
fn string_stop_mask(w: u64) -> u64 {
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below_0x20 = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    zero_in(w ^ (ONES * b'"' as u64)) | zero_in(w ^ (ONES * b'\\' as u64)) | below_0x20 | w & HIGHS
}

/// What kind of usage, before the kind-specific fields are read.
#[derive(Clone, Copy)]
enum Kind {
    Call,
    Message(MessageKind),
}

/// The fields tallyd reads, as found. `seen` has one bit per field so a duplicate
/// (also of a `null`) is noticed.
#[derive(Default)]
struct Fields<'a> {
    seen: u16,
    id: Option<&'a str>,
    account: Option<AccountSid>,
    kind: Option<Kind>,
    timestamp: Option<i64>,
    direction: Option<Direction>,
    phone_number: Option<&'a str>,
    agent_id: Option<&'a str>,
    number_type: Option<NumberType>,
    status: Option<Option<CallStatus>>,
    duration: Option<u32>,
    billsec: Option<u32>,
    mode: Option<Mode>,
    segments: Option<u32>,
}

/// The `number_type` words of calls and of messages; which are valid depends on
/// the kind, known only once the whole object is read.
#[derive(Clone, Copy)]
enum NumberType {
    Local,
    Mobile,
    Tollfree,
    Sip,
    Client,
    Longcode,
    Shortcode,
}

/// A field tallyd reads, recognised without copying or scanning its name.
#[derive(Clone, Copy)]
enum Key {
    Id,
    AccountSid,
    Kind,
    Timestamp,
    Direction,
    PhoneNumber,
    AgentId,
    NumberType,
    Status,
    Duration,
    Billsec,
    Mode,
    Segments,
    /// Any other name: the value is skipped.
    Other,
}

/// At the byte after an opening quote: the first `word` (closing quote included)
/// the input continues with, consumed, as its value; else returns `None` from the
/// enclosing function, unless a fallback expression is given.
macro_rules! pick {
    ($p:expr, { $($word:literal => $v:expr),+ $(,)? } $(else $other:expr)?) => {{
        let rest = &$p.b[$p.i..];
        $(
            if rest.starts_with($word) {
                $p.i += $word.len();
                $v
            } else
        )+
        { pick!(@else $($other)?) }
    }};
    (@else) => { return None };
    (@else $other:expr) => { $other };
}

impl<'a> Fields<'a> {
    /// Marks field `bit` as present; `None` if it already was.
    #[inline]
    fn mark(&mut self, bit: u16) -> Option<()> {
        let b = 1 << bit;
        (self.seen & b == 0).then(|| self.seen |= b)
    }

    /// The CDR, if every rule of docs/contract.md §1 holds; the serde path says why not.
    fn finish(self) -> Option<Cdr<'a>> {
        let id = self.id?;
        // ASCII, so bytes are characters.
        if id.is_empty() || id.len() > 64 {
            return None;
        }
        let usage = match self.kind? {
            Kind::Call => {
                let number_type = match self.number_type {
                    None | Some(NumberType::Local) => CallNumberType::Local,
                    Some(NumberType::Mobile) => CallNumberType::Mobile,
                    Some(NumberType::Tollfree) => CallNumberType::Tollfree,
                    Some(NumberType::Sip) => CallNumberType::Sip,
                    Some(NumberType::Client) => CallNumberType::Client,
                    Some(_) => return None,
                };
                let (duration, billsec) = (self.duration?, self.billsec?);
                if billsec > duration {
                    return None;
                }
                Usage::Call {
                    number_type,
                    status: self.status??,
                    duration,
                    billsec,
                    mode: self.mode,
                }
            }
            Kind::Message(kind) => {
                let number_type = match self.number_type {
                    None | Some(NumberType::Longcode) => MessageNumberType::Longcode,
                    Some(NumberType::Shortcode) => MessageNumberType::Shortcode,
                    Some(NumberType::Tollfree) => MessageNumberType::Tollfree,
                    Some(_) => return None,
                };
                let segments = self.segments.unwrap_or(1);
                if segments == 0 {
                    return None;
                }
                Usage::Message {
                    kind,
                    number_type,
                    segments,
                }
            }
        };
        // Bounded fields out of bounds are for the serde path to name.
        if self
            .phone_number
            .is_some_and(|p| !super::is_phone_number(p))
            || self.agent_id.is_some_and(|a| !super::is_agent_id(a))
        {
            return None;
        }
        Some(Cdr {
            id: Cow::Borrowed(id),
            account: self.account?,
            timestamp: self.timestamp?,
            direction: self.direction?,
            phone_number: self.phone_number.map(Cow::Borrowed),
            agent_id: self.agent_id.map(Cow::Borrowed),
            usage,
        })
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    #[inline]
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string of plain ASCII (no escapes, no control characters): its bytes.
    #[inline(always)]
    fn bytes(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        let mut i = start;
        // Eight bytes at a time, jumping straight to the first byte that ends the run.
        while let Some(chunk) = self.b.get(i..i + 8) {
            let m = string_stop_mask(u64::from_le_bytes(chunk.try_into().ok()?));
            if m != 0 {
                i += (m.trailing_zeros() / 8) as usize;
                return self.close(start, i);
            }
            i += 8;
        }
        while let Some(&c) = self.b.get(i) {
            if c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c) {
                return self.close(start, i);
            }
            i += 1;
        }
        None
    }

    /// Ends a string at `end` if the byte there is its closing quote.
    #[inline]
    fn close(&mut self, start: usize, end: usize) -> Option<&'a [u8]> {
        (*self.b.get(end)? == b'"').then(|| {
            self.i = end + 1;
            &self.b[start..end]
        })
    }

    /// A plain ASCII string as `&str`.
    #[inline]
    fn str(&mut self) -> Option<&'a str> {
        let b = self.bytes()?;
        debug_assert!(b.is_ascii());
        // SAFETY: `bytes` only returns runs it checked byte by byte (or eight at a
        // time) to be below 0x80, and ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(b) })
    }

    /// A non-negative integer that fits a `u32`, written as JSON writes it.
    #[inline]
    fn uint(&mut self) -> Option<u32> {
        let start = self.i;
        let mut v: u64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            v = v * 10 + (d - b'0') as u64;
            self.i += 1;
            if self.i - start > 10 {
                return None;
            }
        }
        let len = self.i - start;
        // None, a leading zero, a fraction or an exponent: serde_json's call.
        if len == 0
            || (self.b[start] == b'0' && len > 1)
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        u32::try_from(v).ok()
    }

    /// `null` (the field counts as absent) or a value read by `read`.
    #[inline]
    fn nullable<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        read(self).map(Some)
    }

    /// The whole message: one object, then only whitespace.
    fn object(&mut self, f: &mut Fields<'a>) -> Option<()> {
        self.ws();
        self.eat(b'{')?;
        self.ws();
        loop {
            let key = self.key()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            self.field(key, f)?;
            self.ws();
            match self.peek()? {
                b',' => {
                    self.i += 1;
                    self.ws();
                }
                b'}' => {
                    self.i += 1;
                    break;
                }
                _ => return None,
            }
        }
        self.ws();
        (self.i == self.b.len()).then_some(())
    }

    /// A field name: compared in place against the names tallyd reads (each a
    /// couple of word compares), scanned only when it is none of them.
    #[inline]
    fn key(&mut self) -> Option<Key> {
        self.eat(b'"')?;
        let other = |p: &mut Self| {
            p.i -= 1;
            p.bytes().map(|_| Key::Other)
        };
        Some(match self.peek()? {
            b'i' => pick!(self, { b"id\"" => Key::Id } else other(self)?),
            b'a' => pick!(self, {
                b"account_sid\"" => Key::AccountSid,
                b"agent_id\"" => Key::AgentId,
            } else other(self)?),
            b'k' => pick!(self, { b"kind\"" => Key::Kind } else other(self)?),
            b't' => pick!(self, { b"timestamp\"" => Key::Timestamp } else other(self)?),
            b'd' => pick!(self, {
                b"direction\"" => Key::Direction,
                b"duration\"" => Key::Duration,
            } else other(self)?),
            b'p' => pick!(self, { b"phone_number\"" => Key::PhoneNumber } else other(self)?),
            b'n' => pick!(self, { b"number_type\"" => Key::NumberType } else other(self)?),
            b's' => pick!(self, {
                b"status\"" => Key::Status,
                b"segments\"" => Key::Segments,
            } else other(self)?),
            b'b' => pick!(self, { b"billsec\"" => Key::Billsec } else other(self)?),
            b'm' => pick!(self, { b"mode\"" => Key::Mode } else other(self)?),
            _ => other(self)?,
        })
    }

    /// One field's value, into its slot if tallyd reads it.
    #[inline]
    fn field(&mut self, key: Key, f: &mut Fields<'a>) -> Option<()> {
        if let Key::Other = key {
            return self.skip_value(0);
        }
        f.mark(key as u16)?;
        match key {
            Key::Id => f.id = Some(self.str()?),
            Key::AccountSid => {
                // Fixed width: `"AC` + 32 hex digits + `"`, no scan needed.
                let v = self.b.get(self.i..self.i + 36)?;
                if v[0] != b'"' || v[35] != b'"' {
                    return None;
                }
                f.account = Some(AccountSid::parse_bytes(&v[1..35])?);
                self.i += 36;
            }
            Key::Kind => {
                self.eat(b'"')?;
                f.kind = Some(pick!(self, {
                    b"call\"" => Kind::Call,
                    b"sms\"" => Kind::Message(MessageKind::Sms),
                    b"mms\"" => Kind::Message(MessageKind::Mms),
                }));
            }
            Key::Timestamp => f.timestamp = Some(parse_rfc3339_bytes(self.bytes()?)?),
            Key::Direction => {
                self.eat(b'"')?;
                f.direction = Some(pick!(self, {
                    b"inbound\"" => Direction::Inbound,
                    b"outbound\"" => Direction::Outbound,
                }));
            }
            Key::PhoneNumber => f.phone_number = self.nullable(Self::str)?,
            Key::AgentId => f.agent_id = self.nullable(Self::str)?,
            Key::NumberType => {
                f.number_type = self.nullable(|p| {
                    p.eat(b'"')?;
                    Some(pick!(p, {
                        b"local\"" => NumberType::Local,
                        b"mobile\"" => NumberType::Mobile,
                        b"tollfree\"" => NumberType::Tollfree,
                        b"longcode\"" => NumberType::Longcode,
                        b"shortcode\"" => NumberType::Shortcode,
                        b"sip\"" => NumberType::Sip,
                        b"client\"" => NumberType::Client,
                    }))
                })?
            }
            Key::Status => {
                // Any string is a message's status; only these are a call's.
                f.status = self.nullable(|p| {
                    p.eat(b'"')?;
                    Some(pick!(p, {
                        b"completed\"" => Some(CallStatus::Completed),
                        b"no-answer\"" => Some(CallStatus::NoAnswer),
                        b"busy\"" => Some(CallStatus::Busy),
                        b"failed\"" => Some(CallStatus::Failed),
                        b"canceled\"" => Some(CallStatus::Canceled),
                    } else {
                        p.i -= 1;
                        p.bytes()?;
                        None
                    }))
                })?
            }
            Key::Duration => f.duration = Some(self.uint()?),
            Key::Billsec => f.billsec = Some(self.uint()?),
            Key::Mode => {
                f.mode = self.nullable(|p| {
                    p.eat(b'"')?;
                    Some(pick!(p, {
                        b"webhook\"" => Mode::Webhook,
                        b"hosted\"" => Mode::Hosted,
                    }))
                })?
            }
            Key::Segments => f.segments = self.nullable(Self::uint)?,
            Key::Other => {} // skipped above
        }
        Some(())
    }

    /// Skips any JSON value tallyd does not read, checking its grammar.
    fn skip_value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.bytes().map(|_| ()),
            b'-' | b'0'..=b'9' => self.skip_number(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            open @ (b'[' | b'{') => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let close = if open == b'[' { b']' } else { b'}' };
                self.i += 1;
                self.ws();
                if self.eat(close).is_some() {
                    return Some(());
                }
                loop {
                    if open == b'{' {
                        self.bytes()?;
                        self.ws();
                        self.eat(b':')?;
                        self.ws();
                    }
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => {
                            self.i += 1;
                            self.ws();
                        }
                        c if c == close => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn skip_number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    #[inline]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    #[inline]
    fn some_digits(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_stop_bytes_are_found_in_any_lane() {
        for background in [b'a', b' ', 0x7f, b'~'] {
            for lane in 0..8 {
                for b in 0..=255u8 {
                    let mut w = [background; 8];
                    w[lane] = b;
                    let stop = b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b);
                    let m = string_stop_mask(u64::from_le_bytes(w));
                    assert_eq!(m != 0, stop, "{w:?}");
                    if stop {
                        assert_eq!(m.trailing_zeros() / 8, lane as u32, "{w:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn reads_the_common_shape_and_leaves_the_rest() {
        let sid = "AC0123456789abcdef0123456789abcdef";
        let ok = format!(
            r#"{{"id":"CA1","account_sid":"{sid}","kind":"call","timestamp":"2025-01-09T13:45:00Z","direction":"inbound","status":"completed","duration":70,"billsec":61,"mode":null,"x":[1,{{"y":-2.5e3}}]}}"#
        );
        let cdr = decode(ok.as_bytes()).expect("common shape");
        assert!(matches!(cdr.id, Cow::Borrowed("CA1")));
        assert_eq!(cdr.timestamp, 1_736_430_300);
        // Valid, but not the fast path's to decide: an escape, a float, non-ASCII.
        for other in [
            ok.replace("\"CA1\"", "\"C\\u0041\""),
            ok.replace(":70", ":70.0"),
            ok.replace("\"CA1\"", "\"Cé1\""),
        ] {
            assert!(decode(other.as_bytes()).is_none(), "{other}");
            assert!(super::super::decode(other.as_bytes()).is_ok(), "{other}");
        }
        // Invalid: never the fast path's.
        for bad in [
            ok.replace(":61", ":71"),
            ok.replace("\"call\"", "\"fax\""),
            ok.replace(",\"x\"", ",\"id\":\"CA2\",\"x\""),
            ok.replace(":null", ":null,\"mode\":null"),
        ] {
            assert!(decode(bad.as_bytes()).is_none(), "{bad}");
            assert!(super::super::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
