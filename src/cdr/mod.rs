//! CDR decoding and validation (docs/contract.md §1).
//!
//! One JSON object per Kafka message, decoded in one of two ways:
//!
//! - [`fast`]: a byte scanner for the shape switches actually send (ASCII, no
//!   escapes, integers where tallyd reads numbers). It reads each field it knows
//!   straight into its typed value — enum, SID, Unix time, `u32` — borrowing
//!   strings from the input, and answers either a valid [`Cdr`] or "not sure".
//! - Everything it is not sure of, including every invalid message, goes to
//!   serde_json with a hand-written map visitor (only JSON-escaped strings are
//!   copied, unknown fields are skipped without being materialised). It fills
//!   loosely typed [`Scalar`] slots so that a wrong type is reported with the
//!   field's name instead of serde's column number, and [`validate`] gives every
//!   rejection its reason and message.
//!
//! The fast path accepts a strict subset of what the second accepts and yields the
//! same CDR for it; the `decode` fuzz target and the property tests hold the two
//! equal on any input.

mod fast;

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::calendar::{parse_rfc3339, Day};
use crate::category::Category;

/// An account SID (`AC` + 32 lowercase hex digits) held as its 128-bit value, so the
/// hot path keys counters without allocating.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountSid(pub u128);

impl AccountSid {
    /// Parses `AC` + 32 lowercase hex digits.
    pub fn parse(s: &str) -> Option<AccountSid> {
        AccountSid::parse_bytes(s.as_bytes())
    }

    /// [`AccountSid::parse`] on bytes.
    #[inline]
    pub fn parse_bytes(b: &[u8]) -> Option<AccountSid> {
        if b.len() != 34 || &b[..2] != b"AC" {
            return None;
        }
        let mut v = 0u128;
        for chunk in b[2..].chunks_exact(8) {
            v = (v << 32) | hex8(chunk.try_into().ok()?)? as u128;
        }
        Some(AccountSid(v))
    }

    /// The SID as text (`AC` + 32 lowercase hex digits), written into `buf`
    /// without the formatting machinery: a flush writes one per stored page.
    pub fn write_text<'b>(&self, buf: &'b mut [u8; 34]) -> &'b str {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        buf[..2].copy_from_slice(b"AC");
        for (i, b) in buf[2..].iter_mut().enumerate() {
            *b = DIGITS[(self.0 >> (124 - 4 * i) & 0xf) as usize];
        }
        // SAFETY: every byte written above is ASCII.
        unsafe { std::str::from_utf8_unchecked(buf) }
    }
}

/// Eight lowercase hex digits → their value, all eight bytes checked and
/// converted at once in one 64-bit word (SWAR): ~20 instructions where a lookup
/// table per digit took ~100 (callgrind; a SID is parsed for every CDR).
#[inline]
fn hex8(digits: [u8; 8]) -> Option<u32> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // First digit in the top byte, so the digits' order is the number's.
    let x = u64::from_be_bytes(digits);
    if x & HIGHS != 0 {
        return None;
    }
    // For bytes below 0x80 these sums never carry into the next byte: the high
    // bit of each byte says byte ≥ `lo`, or byte > `hi`.
    let at_least = |lo: u8| x.wrapping_add(ONES * (0x80 - lo) as u64) & HIGHS;
    let above = |hi: u8| x.wrapping_add(ONES * (0x7f - hi) as u64) & HIGHS;
    let digit = at_least(b'0') & !above(b'9');
    let letter = at_least(b'a') & !above(b'f');
    if digit | letter != HIGHS {
        return None;
    }
    // Each byte's value (letters have bit 6 set: +9), then pairs, quads, all eight.
    let v = (x & (ONES * 0x0f)) + ((x >> 6) & ONES) * 9;
    let v = (v | (v >> 4)) & 0x00ff_00ff_00ff_00ff;
    let v = (v | (v >> 8)) & 0x0000_ffff_0000_ffff;
    Some(((v | (v >> 16)) & 0xffff_ffff) as u32)
}

impl fmt::Display for AccountSid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AC{:032x}", self.0)
    }
}

impl fmt::Debug for AccountSid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallNumberType {
    Local,
    Mobile,
    Tollfree,
    Sip,
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageNumberType {
    Longcode,
    Shortcode,
    Tollfree,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallStatus {
    Completed,
    NoAnswer,
    Busy,
    Failed,
    Canceled,
}

/// AgentPhone's two voice modes, priced differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Webhook,
    Hosted,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Webhook, Mode::Hosted];
    pub fn name(self) -> &'static str {
        match self {
            Mode::Webhook => "webhook",
            Mode::Hosted => "hosted",
        }
    }
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Sms,
    Mms,
}

/// What kind of usage a CDR records, with the fields that only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    Call {
        number_type: CallNumberType,
        status: CallStatus,
        /// Setup to hang-up, ringing included.
        duration: u32,
        /// Connected (answered) seconds: what is billed.
        billsec: u32,
        mode: Option<Mode>,
    },
    Message {
        kind: MessageKind,
        number_type: MessageNumberType,
        segments: u32,
    },
}

/// A validated CDR, borrowing its strings from the message bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cdr<'a> {
    pub id: Cow<'a, str>,
    pub account: AccountSid,
    /// Event time, Unix seconds.
    pub timestamp: i64,
    pub direction: Direction,
    pub phone_number: Option<Cow<'a, str>>,
    pub agent_id: Option<Cow<'a, str>>,
    pub usage: Usage,
}

impl Cdr<'_> {
    /// The UTC day the usage is bucketed in (event time, however late it arrives).
    pub fn day(&self) -> Day {
        Day::from_unix(self.timestamp)
    }

    /// The leaf category this CDR lands in (docs/contract.md §2).
    pub fn leaf(&self) -> Category {
        use Category::*;
        match (&self.usage, self.direction) {
            (Usage::Call { number_type, .. }, dir) => match (number_type, dir) {
                (CallNumberType::Sip, Direction::Inbound) => CallsSipInbound,
                (CallNumberType::Sip, Direction::Outbound) => CallsSipOutbound,
                (CallNumberType::Client, _) => CallsClient,
                (_, Direction::Outbound) => CallsOutbound,
                (CallNumberType::Local, Direction::Inbound) => CallsInboundLocal,
                (CallNumberType::Mobile, Direction::Inbound) => CallsInboundMobile,
                (CallNumberType::Tollfree, Direction::Inbound) => CallsInboundTollfree,
            },
            (
                Usage::Message {
                    kind, number_type, ..
                },
                dir,
            ) => {
                // Toll-free messages count as longcode (docs/contract.md §2).
                let short = *number_type == MessageNumberType::Shortcode;
                match (kind, dir, short) {
                    (MessageKind::Sms, Direction::Inbound, false) => SmsInboundLongcode,
                    (MessageKind::Sms, Direction::Inbound, true) => SmsInboundShortcode,
                    (MessageKind::Sms, Direction::Outbound, false) => SmsOutboundLongcode,
                    (MessageKind::Sms, Direction::Outbound, true) => SmsOutboundShortcode,
                    (MessageKind::Mms, Direction::Inbound, false) => MmsInboundLongcode,
                    (MessageKind::Mms, Direction::Inbound, true) => MmsInboundShortcode,
                    (MessageKind::Mms, Direction::Outbound, false) => MmsOutboundLongcode,
                    (MessageKind::Mms, Direction::Outbound, true) => MmsOutboundShortcode,
                }
            }
        }
    }
}

/// Why a message was not counted; the `as_str` form is the dead-letter header value
/// and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    InvalidJson,
    NotAnObject,
    DuplicateField,
    MissingField,
    WrongType,
    BadId,
    BadAccountSid,
    UnsupportedKind,
    BadTimestamp,
    BadDirection,
    BadNumberType,
    BadStatus,
    BadMode,
    NegativeValue,
    ValueTooLarge,
    BillsecExceedsDuration,
    BadSegments,
    BadPhoneNumber,
    BadAgentId,
}

impl RejectReason {
    pub const ALL: [RejectReason; 19] = [
        RejectReason::InvalidJson,
        RejectReason::NotAnObject,
        RejectReason::DuplicateField,
        RejectReason::MissingField,
        RejectReason::WrongType,
        RejectReason::BadId,
        RejectReason::BadAccountSid,
        RejectReason::UnsupportedKind,
        RejectReason::BadTimestamp,
        RejectReason::BadDirection,
        RejectReason::BadNumberType,
        RejectReason::BadStatus,
        RejectReason::BadMode,
        RejectReason::NegativeValue,
        RejectReason::ValueTooLarge,
        RejectReason::BillsecExceedsDuration,
        RejectReason::BadSegments,
        RejectReason::BadPhoneNumber,
        RejectReason::BadAgentId,
    ];

    pub fn as_str(self) -> &'static str {
        use RejectReason::*;
        match self {
            InvalidJson => "invalid_json",
            NotAnObject => "not_an_object",
            DuplicateField => "duplicate_field",
            MissingField => "missing_field",
            WrongType => "wrong_type",
            BadId => "bad_id",
            BadAccountSid => "bad_account_sid",
            UnsupportedKind => "unsupported_kind",
            BadTimestamp => "bad_timestamp",
            BadDirection => "bad_direction",
            BadNumberType => "bad_number_type",
            BadStatus => "bad_status",
            BadMode => "bad_mode",
            NegativeValue => "negative_value",
            ValueTooLarge => "value_too_large",
            BillsecExceedsDuration => "billsec_exceeds_duration",
            BadSegments => "bad_segments",
            BadPhoneNumber => "bad_phone_number",
            BadAgentId => "bad_agent_id",
        }
    }
}

/// A rejected message: machine-readable reason, the field at fault and a message
/// naming the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}", reason = .reason.as_str())]
pub struct Rejection {
    pub reason: RejectReason,
    pub field: Option<&'static str>,
    pub message: String,
}

impl Rejection {
    fn new(reason: RejectReason, field: &'static str, message: String) -> Rejection {
        Rejection {
            reason,
            field: Some(field),
            message,
        }
    }
}

/// A JSON value as the decoder sees it: just enough to check types and name them.
#[derive(Debug, Clone, PartialEq)]
enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    /// An object or array where a scalar was expected.
    Nested,
}

impl Scalar<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "boolean",
            Scalar::Int(_) | Scalar::UInt(_) => "integer",
            Scalar::Float(_) => "number",
            Scalar::Str(_) => "string",
            Scalar::Nested => "object or array",
        }
    }
    fn shown(&self) -> String {
        match self {
            Scalar::Str(s) => format!("{:?}", truncate(s)),
            Scalar::Int(i) => i.to_string(),
            Scalar::UInt(u) => u.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Null => "null".into(),
            Scalar::Nested => "an object or array".into(),
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::UInt(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Nested)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Nested)
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields tallyd reads, in one fixed slot each.
#[derive(Default)]
struct RawFields<'a> {
    slots: [Option<Scalar<'a>>; FIELDS.len()],
    duplicate: Option<&'static str>,
}

const FIELDS: [&str; 13] = [
    "id",
    "account_sid",
    "kind",
    "timestamp",
    "direction",
    "phone_number",
    "agent_id",
    "number_type",
    "status",
    "duration",
    "billsec",
    "mode",
    "segments",
];

/// The slot of a field tallyd reads, `None` for a field it ignores.
#[inline]
fn field_index(key: &[u8]) -> Option<usize> {
    Some(match key {
        b"id" => 0,
        b"account_sid" => 1,
        b"kind" => 2,
        b"timestamp" => 3,
        b"direction" => 4,
        b"phone_number" => 5,
        b"agent_id" => 6,
        b"number_type" => 7,
        b"status" => 8,
        b"duration" => 9,
        b"billsec" => 10,
        b"mode" => 11,
        b"segments" => 12,
        _ => return None,
    })
}

/// A field key, borrowed when the input allows.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

struct TopLevel<'a>(Option<RawFields<'a>>);

impl<'de> de::Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a CDR object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut raw = RawFields::default();
                while let Some(Key(k)) = a.next_key::<Key>()? {
                    match field_index(k.as_bytes()) {
                        Some(i) => {
                            let v = a.next_value::<Scalar>()?;
                            if raw.slots[i].replace(v).is_some() && raw.duplicate.is_none() {
                                raw.duplicate = Some(FIELDS[i]);
                            }
                        }
                        None => {
                            a.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(TopLevel(Some(raw)))
            }
            // Any non-object top level is valid JSON but not a CDR.
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TopLevel(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(TopLevel(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(TopLevel(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(TopLevel(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(TopLevel(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(TopLevel(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(TopLevel(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'a> RawFields<'a> {
    fn take(&mut self, name: &'static str) -> Option<Scalar<'a>> {
        let i = field_index(name.as_bytes()).expect("known field");
        // An explicit JSON null is treated as absent.
        self.slots[i].take().filter(|v| *v != Scalar::Null)
    }

    fn required_str(&mut self, name: &'static str) -> Result<Cow<'a, str>, Rejection> {
        match self.take(name) {
            None => Err(Rejection::new(
                RejectReason::MissingField,
                name,
                format!("required field `{name}` is missing"),
            )),
            Some(v) => as_str(name, v),
        }
    }

    fn optional_str(&mut self, name: &'static str) -> Result<Option<Cow<'a, str>>, Rejection> {
        self.take(name).map(|v| as_str(name, v)).transpose()
    }

    fn required_uint(&mut self, name: &'static str) -> Result<u32, Rejection> {
        match self.take(name) {
            None => Err(Rejection::new(
                RejectReason::MissingField,
                name,
                format!("required field `{name}` is missing"),
            )),
            Some(v) => as_uint(name, v),
        }
    }

    fn optional_uint(&mut self, name: &'static str) -> Result<Option<u32>, Rejection> {
        self.take(name).map(|v| as_uint(name, v)).transpose()
    }
}

fn as_str<'a>(name: &'static str, v: Scalar<'a>) -> Result<Cow<'a, str>, Rejection> {
    match v {
        Scalar::Str(s) => Ok(s),
        other => Err(Rejection::new(
            RejectReason::WrongType,
            name,
            format!(
                "field `{name}` must be a string, got {} {}",
                other.type_name(),
                other.shown()
            ),
        )),
    }
}

fn as_uint(name: &'static str, v: Scalar<'_>) -> Result<u32, Rejection> {
    // 30.0 is still a whole number of seconds; 30.5 is not. A huge one (1e300)
    // is a whole number too, only too large: the cast saturates, and the message
    // shows the number as written.
    let (n, float): (i128, Option<f64>) = match v {
        Scalar::Int(i) => (i as i128, None),
        Scalar::UInt(u) => (u as i128, None),
        Scalar::Float(f) if f.fract() == 0.0 => (f as i128, Some(f)),
        other => {
            return Err(Rejection::new(
                RejectReason::WrongType,
                name,
                format!(
                    "field `{name}` must be a whole number, got {} {}",
                    other.type_name(),
                    other.shown()
                ),
            ))
        }
    };
    let shown = || match float {
        Some(f) if f.abs() >= 1e16 => format!("{f:e}"),
        _ => n.to_string(),
    };
    if n < 0 {
        return Err(Rejection::new(
            RejectReason::NegativeValue,
            name,
            format!("field `{name}` must be ≥ 0, got {}", shown()),
        ));
    }
    u32::try_from(n).map_err(|_| {
        Rejection::new(
            RejectReason::ValueTooLarge,
            name,
            format!("field `{name}` = {} is larger than {}", shown(), u32::MAX),
        )
    })
}

fn bad_value(reason: RejectReason, name: &'static str, value: &str, allowed: &str) -> Rejection {
    Rejection::new(
        reason,
        name,
        format!(
            "field `{name}` = {:?} is not one of {allowed}",
            truncate(value)
        ),
    )
}

/// Longest `phone_number` that is a `sip:`, `sips:` or `client:` address, in
/// bytes (visible ASCII).
pub const MAX_ADDRESS_BYTES: usize = 128;
/// Longest `agent_id`, in characters.
pub const MAX_AGENT_ID_CHARS: usize = 128;

/// Whether `s` may be a CDR's `phone_number`: E.164 (`+`, then 1 to 15 digits,
/// the first not 0), or a `sip:`, `sips:` or `client:` address (the account's
/// own SIP endpoint or client name) of at most [`MAX_ADDRESS_BYTES`] visible
/// ASCII characters. Bounded so that what a CDR brings into the by-number
/// breakdown and the stored pages is bounded too.
pub fn is_phone_number(s: &str) -> bool {
    if let Some(digits) = s.strip_prefix('+') {
        return (1..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
    }
    ["sip:", "sips:", "client:"]
        .iter()
        .any(|scheme| s.len() > scheme.len() && s.starts_with(scheme))
        && s.len() <= MAX_ADDRESS_BYTES
        && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `s` may be a CDR's `agent_id`: 1 to [`MAX_AGENT_ID_CHARS`]
/// characters, none a control character.
pub fn is_agent_id(s: &str) -> bool {
    // Up to MAX bytes is up to MAX characters; only longer ids need counting.
    !s.is_empty()
        && (s.len() <= MAX_AGENT_ID_CHARS || s.chars().count() <= MAX_AGENT_ID_CHARS)
        && !s.chars().any(char::is_control)
}

/// Decodes and validates one message. Never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<Cdr<'_>, Rejection> {
    match fast::decode(bytes) {
        Some(cdr) => Ok(cdr),
        None => validate(&mut parse_json(bytes)?),
    }
}

/// [`decode`] without the fast path: serde_json for every message. The fuzzer and
/// the tests hold the two equal on every input.
#[doc(hidden)]
pub fn decode_with_serde_json(bytes: &[u8]) -> Result<Cdr<'_>, Rejection> {
    validate(&mut parse_json(bytes)?)
}

fn parse_json(bytes: &[u8]) -> Result<RawFields<'_>, Rejection> {
    // serde_json checks UTF-8 only in the strings it reads, not in those it skips
    // (unknown fields), so the whole message is checked first.
    let text = std::str::from_utf8(bytes).map_err(|e| Rejection {
        reason: RejectReason::InvalidJson,
        field: None,
        message: format!("message is not valid UTF-8: {e}"),
    })?;
    let TopLevel(raw) = serde_json::from_str::<TopLevel>(text).map_err(|e| Rejection {
        reason: RejectReason::InvalidJson,
        field: None,
        message: format!("message is not valid JSON: {e}"),
    })?;
    raw.ok_or_else(|| Rejection {
        reason: RejectReason::NotAnObject,
        field: None,
        message: "message is JSON but not an object".into(),
    })
}

fn validate<'a>(raw: &mut RawFields<'a>) -> Result<Cdr<'a>, Rejection> {
    if let Some(field) = raw.duplicate {
        return Err(Rejection::new(
            RejectReason::DuplicateField,
            field,
            format!("field `{field}` appears more than once"),
        ));
    }

    let id = raw.required_str("id")?;
    // Up to 64 bytes is up to 64 characters; only longer ids need counting.
    if id.is_empty() || (id.len() > 64 && id.chars().count() > 64) {
        return Err(Rejection::new(
            RejectReason::BadId,
            "id",
            format!(
                "field `id` must be 1–64 characters, got {} characters",
                id.chars().count()
            ),
        ));
    }
    let sid = raw.required_str("account_sid")?;
    let account = AccountSid::parse(&sid).ok_or_else(|| {
        Rejection::new(
            RejectReason::BadAccountSid,
            "account_sid",
            format!(
                "field `account_sid` = {:?} is not AC followed by 32 lowercase hex digits",
                truncate(&sid)
            ),
        )
    })?;
    let kind = raw.required_str("kind")?;
    let ts = raw.required_str("timestamp")?;
    let timestamp = parse_rfc3339(&ts).ok_or_else(|| {
        Rejection::new(
            RejectReason::BadTimestamp,
            "timestamp",
            format!(
                "field `timestamp` = {:?} is not an RFC 3339 time",
                truncate(&ts)
            ),
        )
    })?;
    let dir = raw.required_str("direction")?;
    let direction = match &*dir {
        "inbound" => Direction::Inbound,
        "outbound" => Direction::Outbound,
        other => {
            return Err(bad_value(
                RejectReason::BadDirection,
                "direction",
                other,
                "inbound, outbound",
            ))
        }
    };
    let phone_number = raw.optional_str("phone_number")?;
    if let Some(p) = phone_number.as_deref().filter(|p| !is_phone_number(p)) {
        return Err(Rejection::new(
            RejectReason::BadPhoneNumber,
            "phone_number",
            format!(
                "field `phone_number` = {:?} is neither an E.164 number (+ and 1 to 15 digits) \
                 nor a sip:, sips: or client: address of at most {MAX_ADDRESS_BYTES} visible ASCII characters",
                truncate(p)
            ),
        ));
    }
    let agent_id = raw.optional_str("agent_id")?;
    if let Some(a) = agent_id.as_deref().filter(|a| !is_agent_id(a)) {
        return Err(Rejection::new(
            RejectReason::BadAgentId,
            "agent_id",
            format!(
                "field `agent_id` = {:?} must be 1 to {MAX_AGENT_ID_CHARS} characters without control characters",
                truncate(a)
            ),
        ));
    }

    let usage = match &*kind {
        "call" => decode_call(raw)?,
        "sms" => decode_message(raw, MessageKind::Sms)?,
        "mms" => decode_message(raw, MessageKind::Mms)?,
        other => {
            return Err(Rejection::new(
                RejectReason::UnsupportedKind,
                "kind",
                format!(
                    "field `kind` = {:?} is not one this version rates (call, sms, mms)",
                    truncate(other)
                ),
            ))
        }
    };
    Ok(Cdr {
        id,
        account,
        timestamp,
        direction,
        phone_number,
        agent_id,
        usage,
    })
}

fn decode_call(raw: &mut RawFields<'_>) -> Result<Usage, Rejection> {
    let number_type = match raw.optional_str("number_type")?.as_deref() {
        None | Some("local") => CallNumberType::Local,
        Some("mobile") => CallNumberType::Mobile,
        Some("tollfree") => CallNumberType::Tollfree,
        Some("sip") => CallNumberType::Sip,
        Some("client") => CallNumberType::Client,
        Some(other) => {
            return Err(bad_value(
                RejectReason::BadNumberType,
                "number_type",
                other,
                "local, mobile, tollfree, sip, client",
            ))
        }
    };
    let status = match &*raw.required_str("status")? {
        "completed" => CallStatus::Completed,
        "no-answer" => CallStatus::NoAnswer,
        "busy" => CallStatus::Busy,
        "failed" => CallStatus::Failed,
        "canceled" => CallStatus::Canceled,
        other => {
            return Err(bad_value(
                RejectReason::BadStatus,
                "status",
                other,
                "completed, no-answer, busy, failed, canceled",
            ))
        }
    };
    let duration = raw.required_uint("duration")?;
    let billsec = raw.required_uint("billsec")?;
    if billsec > duration {
        return Err(Rejection::new(
            RejectReason::BillsecExceedsDuration,
            "billsec",
            format!("field `billsec` = {billsec} exceeds `duration` = {duration}"),
        ));
    }
    let mode = match raw.optional_str("mode")? {
        None => None,
        Some(m) => Some(
            Mode::parse(&m)
                .ok_or_else(|| bad_value(RejectReason::BadMode, "mode", &m, "webhook, hosted"))?,
        ),
    };
    Ok(Usage::Call {
        number_type,
        status,
        duration,
        billsec,
        mode,
    })
}

fn decode_message(raw: &mut RawFields<'_>, kind: MessageKind) -> Result<Usage, Rejection> {
    let number_type = match raw.optional_str("number_type")?.as_deref() {
        None | Some("longcode") => MessageNumberType::Longcode,
        Some("shortcode") => MessageNumberType::Shortcode,
        Some("tollfree") => MessageNumberType::Tollfree,
        Some(other) => {
            return Err(bad_value(
                RejectReason::BadNumberType,
                "number_type",
                other,
                "longcode, shortcode, tollfree",
            ))
        }
    };
    let segments = raw.optional_uint("segments")?.unwrap_or(1);
    if segments == 0 {
        return Err(Rejection::new(
            RejectReason::BadSegments,
            "segments",
            "field `segments` must be ≥ 1, got 0".into(),
        ));
    }
    // `status` is optional for messages and not used for rating; only its type is checked.
    raw.optional_str("status")?;
    Ok(Usage::Message {
        kind,
        number_type,
        segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "AC0123456789abcdef0123456789abcdef";

    fn call(extra: &str) -> String {
        format!(
            r#"{{"id":"CA1","account_sid":"{SID}","kind":"call","timestamp":"2025-01-09T13:45:00Z","direction":"inbound","status":"completed","duration":70,"billsec":61{extra}}}"#
        )
    }

    #[test]
    fn decodes_a_call_borrowing_strings() {
        let s = call(r#","phone_number":"+14155550100","agent_id":"agt_1","unknown":{"x":[1,2]}"#);
        let cdr = decode(s.as_bytes()).unwrap();
        assert!(matches!(cdr.id, Cow::Borrowed("CA1")));
        assert_eq!(cdr.account.to_string(), SID);
        assert_eq!(cdr.leaf(), Category::CallsInboundLocal);
        assert_eq!(cdr.day().to_string(), "2025-01-09");
        assert_eq!(cdr.phone_number.as_deref(), Some("+14155550100"));
        assert_eq!(
            cdr.usage,
            Usage::Call {
                number_type: CallNumberType::Local,
                status: CallStatus::Completed,
                duration: 70,
                billsec: 61,
                mode: None
            }
        );
    }

    #[test]
    fn decodes_messages_with_defaults() {
        let s = format!(
            r#"{{"id":"SM1","account_sid":"{SID}","kind":"mms","timestamp":"2025-01-09T13:45:00Z","direction":"outbound","number_type":"tollfree"}}"#
        );
        let cdr = decode(s.as_bytes()).unwrap();
        assert_eq!(cdr.leaf(), Category::MmsOutboundLongcode);
        assert!(matches!(cdr.usage, Usage::Message { segments: 1, .. }));
    }

    fn reason(s: &str) -> (RejectReason, Option<&'static str>, String) {
        let r = decode(s.as_bytes()).unwrap_err();
        (r.reason, r.field, r.message)
    }

    #[test]
    fn sid_digits_are_exactly_the_lowercase_hex_ones() {
        let valid = "AC0123456789abcdef0123456789abcdef";
        for at in 2..34 {
            for byte in 0..=255u8 {
                let mut b = valid.as_bytes().to_vec();
                b[at] = byte;
                let want = matches!(byte, b'0'..=b'9' | b'a'..=b'f').then(|| {
                    let text = std::str::from_utf8(&b[2..]).unwrap();
                    AccountSid(u128::from_str_radix(text, 16).unwrap())
                });
                assert_eq!(AccountSid::parse_bytes(&b), want, "byte {byte:#x} at {at}");
            }
        }
    }

    #[test]
    fn sid_text_matches_display() {
        for v in [
            0u128,
            1,
            0xabc,
            u128::MAX,
            0x0123456789abcdef0123456789abcdef,
        ] {
            let sid = AccountSid(v);
            assert_eq!(sid.write_text(&mut [0; 34]), sid.to_string());
            assert_eq!(AccountSid::parse(sid.write_text(&mut [0; 34])), Some(sid));
        }
    }

    #[test]
    fn phone_numbers_and_agents_are_bounded() {
        use RejectReason::*;
        for good in [
            "+14155550100",
            "+1",
            "+123456789012345",
            "sip:alice@example.com",
            "client:bob",
            "sips:x",
        ] {
            let s = call(&format!(r#","phone_number":"{good}""#));
            let cdr = decode(s.as_bytes()).unwrap();
            assert_eq!(cdr.phone_number.as_deref(), Some(good));
        }
        let long_uri = format!("sip:{}", "a".repeat(MAX_ADDRESS_BYTES));
        for bad in [
            "",
            "+",
            "14155550100",
            "+0155550100",
            "+1234567890123456",
            "+1 415",
            "tel:+1415",
            "sip:",
            "sip:a b",
            "client:\\u0000x",
            &long_uri,
            &"9".repeat(300_000),
        ] {
            let s = call(&format!(r#","phone_number":"{bad}""#));
            let (r, f, m) = reason(&s);
            assert_eq!(
                (r, f),
                (BadPhoneNumber, Some("phone_number")),
                "{bad:?}: {m}"
            );
            assert!(m.len() < 400, "{}", m.len());
            assert_eq!(
                decode_with_serde_json(s.as_bytes()).unwrap_err().reason,
                BadPhoneNumber
            );
        }
        let longest = "é".repeat(MAX_AGENT_ID_CHARS);
        for good in ["agt_1", "Agent Smith", longest.as_str()] {
            let s = call(&format!(r#","agent_id":"{good}""#));
            let cdr = decode(s.as_bytes()).unwrap();
            assert_eq!(cdr.agent_id.as_deref(), Some(good));
        }
        let too_long = "é".repeat(MAX_AGENT_ID_CHARS + 1);
        for bad in [
            "",
            "a\\u0000b",
            "line\\nbreak",
            too_long.as_str(),
            &"x".repeat(300_000),
        ] {
            let (r, f, m) = reason(&call(&format!(r#","agent_id":"{bad}""#)));
            assert_eq!((r, f), (BadAgentId, Some("agent_id")), "{bad:?}: {m}");
            assert!(m.len() < 400, "{}", m.len());
        }
    }

    #[test]
    fn rejections_name_field_and_value() {
        use RejectReason::*;
        let (r, f, m) = reason(&call("").replace("\"billsec\":61", "\"billsec\":71"));
        assert_eq!((r, f), (BillsecExceedsDuration, Some("billsec")));
        assert!(m.contains("71") && m.contains("70"), "{m}");

        let (r, f, m) = reason(&call("").replace(SID, "AC0123"));
        assert_eq!((r, f), (BadAccountSid, Some("account_sid")));
        assert!(m.contains("AC0123"));

        let (r, _, _) = reason(&call("").replace(SID, &SID.to_uppercase()));
        assert_eq!(r, BadAccountSid, "uppercase hex is not a valid sid");

        let (r, f, m) = reason(&call("").replace("\"duration\":70", "\"duration\":\"70\""));
        assert_eq!((r, f), (WrongType, Some("duration")));
        assert!(m.contains("string"), "{m}");

        let (r, f, _) = reason(&call("").replace("\"duration\":70", "\"duration\":-5"));
        assert_eq!((r, f), (NegativeValue, Some("duration")));

        // Whole numbers written as floats, however large, are too large, not of
        // the wrong type; a fraction is the wrong type.
        for (big, shown) in [
            ("5e9", "= 5000000000 is"),
            ("1e20", "= 1e20 is"),
            ("1e300", "= 1e300 is"),
        ] {
            let (r, f, m) =
                reason(&call("").replace("\"duration\":70", &format!("\"duration\":{big}")));
            assert_eq!((r, f), (ValueTooLarge, Some("duration")), "{big}: {m}");
            assert!(m.contains(shown) && m.contains("4294967295"), "{m}");
        }
        let (r, _, m) = reason(&call("").replace("\"duration\":70", "\"duration\":-1e19"));
        assert_eq!(r, NegativeValue, "{m}");
        let (r, _, m) = reason(&call("").replace("\"duration\":70", "\"duration\":70.5"));
        assert_eq!(r, WrongType, "{m}");

        let (r, f, _) = reason(&call("").replace(",\"status\":\"completed\"", ""));
        assert_eq!((r, f), (MissingField, Some("status")));

        let (r, f, _) = reason(&call("").replace("2025-01-09T13:45:00Z", "2025-02-30T13:45:00Z"));
        assert_eq!((r, f), (BadTimestamp, Some("timestamp")));

        let (r, f, _) = reason(&call(r#","mode":"psychic""#));
        assert_eq!((r, f), (BadMode, Some("mode")));

        let (r, f, _) = reason(&call("").replace("\"call\"", "\"recording\""));
        assert_eq!((r, f), (UnsupportedKind, Some("kind")));

        let (r, f, _) = reason(&call(r#","id":"again""#));
        assert_eq!((r, f), (DuplicateField, Some("id")));

        let (r, f, _) = reason(&call("").replace("\"CA1\"", &format!("\"{}\"", "x".repeat(65))));
        assert_eq!((r, f), (BadId, Some("id")));

        assert_eq!(reason("{not json").0, InvalidJson);
        assert_eq!(reason("[1,2]").0, NotAnObject);
        assert_eq!(reason("").0, InvalidJson);
    }

    /// A CDR is UTF-8 (docs/contract.md §1) in every byte, also in fields tallyd ignores,
    /// whose strings serde_json skips without checking (found by the fuzzer).
    #[test]
    fn invalid_utf8_is_rejected_even_where_ignored() {
        let ok = call("");
        let (head, tail) = ok.as_bytes().split_at(ok.len() - 1);
        for bad in [&b"\xc3"[..], b"\xff", b"\xed\xa0\x80", b"\xe2\x82\x28"] {
            for (before, after) in [
                (&br#","x":""#[..], &br#"""#[..]),
                (br#",""#, br#"":1"#),
                (br#","x":{"y":[""#, br#""]}"#),
            ] {
                let msg = [head, before, bad, after, tail].concat();
                let r = decode(&msg).unwrap_err();
                assert_eq!((r.reason, r.field), (RejectReason::InvalidJson, None));
                assert!(r.message.contains("UTF-8"), "{}", r.message);
                assert_eq!(Err(r), decode_with_serde_json(&msg));
            }
        }
    }

    /// Inputs on the edge of what the fast path reads itself: both paths must give
    /// the same CDR or the same rejection.
    #[test]
    fn fast_path_agrees_with_serde_json() {
        let base = call(r#","phone_number":"+14155550100""#);
        let mut cases: Vec<String> = vec![
            base.clone(),
            format!(" \t\r\n{base}\n "),
            base.replace("\"CA1\"", "\"C\\u0041\""),
            base.replace("\"CA1\"", "\"Cé1\""),
            base.replace(":70", ":70.0"),
            base.replace(":70", ":7e1"),
            base.replace(":70", ":070"),
            base.replace(":70", ":-0"),
            base.replace(":70", ":18446744073709551616"),
            base.replace(":70", ":true"),
            base.replace(":70", ":null"),
            base.replace(":70", ":[70]"),
            base.replace("}", ",}"),
            base.replace("}", "}x"),
            base.replace(
                "}",
                ",\"x\":{\"a\":[1,-2.5e-3,\"s\",{},[],true,false,null]}}",
            ),
            base.replace("}", ",\"x\":[[[[[[[[[[[1]]]]]]]]]]]}"),
            base.replace("}", ",\"x\":[1,]}"),
            base.replace("}", ",\"x\":01}"),
            base.replace("}", ",\"x\":1.}"),
            base.replace("}", ",\"x\":\"\u{1}\"}"),
            base.replace("}", ",\"id\":\"CA2\"}"),
            base.replace("}", ",\"x\":1,\"x\":2}"),
            base.replace("\"phone_number\"", "\"phone_\\u006eumber\""),
            "{}".into(),
            "{ }".into(),
            "[]".into(),
            "\u{feff}{}".into(),
        ];
        // Fields whose validity depends on the kind, read before the kind is known.
        let sms = base
            .replace("\"call\"", "\"sms\"")
            .replace("\"completed\"", "\"delivered\"");
        for (from, to) in [
            ("\"delivered\"", "\"completed\""),
            ("\"delivered\"", "5"),
            ("\"delivered\"", "null"),
            ("\"duration\":70", "\"duration\":null"),
            ("\"duration\":70", "\"duration\":\"x\",\"mode\":\"psychic\""),
            ("}", ",\"number_type\":\"local\"}"),
            ("}", ",\"number_type\":\"tollfree\",\"segments\":0}"),
            ("}", ",\"segments\":null}"),
        ] {
            cases.push(sms.replace(from, to));
        }
        for (from, to) in [
            ("\"completed\"", "\"delivered\""),
            ("\"completed\"", "null"),
            ("}", ",\"segments\":\"x\"}"),
            ("}", ",\"number_type\":\"shortcode\"}"),
            (
                "}",
                ",\"number_type\":null,\"mode\":\"hosted\",\"agent_id\":null}",
            ),
            ("\"phone_number\"", "\"phone_numbers\""),
            ("\"phone_number\"", "\"i\""),
        ] {
            cases.push(base.replace(from, to));
        }
        cases.push(String::from_utf8_lossy(b"{\"id\":\"\xff\"}").into_owned());
        for c in &cases {
            assert_eq!(
                decode(c.as_bytes()),
                decode_with_serde_json(c.as_bytes()),
                "{c}"
            );
        }
        // Invalid UTF-8 inside a string, read and ignored.
        for raw in [&b"{\"id\":\"\xff\"}"[..], b"{\"x\":\"\xc3\"}"] {
            assert_eq!(decode(raw), decode_with_serde_json(raw));
        }
    }
}
