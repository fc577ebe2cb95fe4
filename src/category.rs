//! Twilio usage categories: the leaves a CDR lands in, their rollups, units and
//! descriptions (docs/contract.md §2, Twilio's Usage Records categories).
//!
//! A category is a `u8`-sized enum so the hot path can index arrays with it; the
//! rollup tree is a static parent table, so "every ancestor" is a short walk.

use std::fmt;
use std::str::FromStr;

/// Every category tallyd produces, leaves first, then rollups, then `totalprice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Category {
    CallsInboundLocal,
    CallsInboundMobile,
    CallsInboundTollfree,
    CallsOutbound,
    CallsSipInbound,
    CallsSipOutbound,
    CallsClient,
    SmsInboundLongcode,
    SmsInboundShortcode,
    SmsOutboundLongcode,
    SmsOutboundShortcode,
    MmsInboundLongcode,
    MmsInboundShortcode,
    MmsOutboundLongcode,
    MmsOutboundShortcode,
    // rollups
    CallsInbound,
    CallsSip,
    Calls,
    SmsInbound,
    SmsOutbound,
    Sms,
    MmsInbound,
    MmsOutbound,
    Mms,
    TotalPrice,
}

/// What a category's `count` and `usage` are measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// count in `calls`, usage in `minutes` (kept as whole seconds).
    Calls,
    /// count in `messages`, usage in `messages` (segments).
    Messages,
    /// count empty, usage = price, in the account's currency.
    Price,
}

impl Category {
    /// Number of categories.
    pub const COUNT: usize = 25;
    /// Number of leaf categories (the first `LEAVES` variants).
    pub const LEAVES: usize = 15;

    /// All categories in declaration order (leaves, rollups, `totalprice`).
    pub const ALL: [Category; Self::COUNT] = [
        Category::CallsInboundLocal,
        Category::CallsInboundMobile,
        Category::CallsInboundTollfree,
        Category::CallsOutbound,
        Category::CallsSipInbound,
        Category::CallsSipOutbound,
        Category::CallsClient,
        Category::SmsInboundLongcode,
        Category::SmsInboundShortcode,
        Category::SmsOutboundLongcode,
        Category::SmsOutboundShortcode,
        Category::MmsInboundLongcode,
        Category::MmsInboundShortcode,
        Category::MmsOutboundLongcode,
        Category::MmsOutboundShortcode,
        Category::CallsInbound,
        Category::CallsSip,
        Category::Calls,
        Category::SmsInbound,
        Category::SmsOutbound,
        Category::Sms,
        Category::MmsInbound,
        Category::MmsOutbound,
        Category::Mms,
        Category::TotalPrice,
    ];

    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    #[inline]
    pub fn from_index(i: usize) -> Option<Category> {
        Self::ALL.get(i).copied()
    }

    #[inline]
    pub fn is_leaf(self) -> bool {
        self.index() < Self::LEAVES
    }

    /// The Twilio name, e.g. `calls-inbound-local`.
    pub fn name(self) -> &'static str {
        use Category::*;
        match self {
            CallsInboundLocal => "calls-inbound-local",
            CallsInboundMobile => "calls-inbound-mobile",
            CallsInboundTollfree => "calls-inbound-tollfree",
            CallsOutbound => "calls-outbound",
            CallsSipInbound => "calls-sip-inbound",
            CallsSipOutbound => "calls-sip-outbound",
            CallsClient => "calls-client",
            SmsInboundLongcode => "sms-inbound-longcode",
            SmsInboundShortcode => "sms-inbound-shortcode",
            SmsOutboundLongcode => "sms-outbound-longcode",
            SmsOutboundShortcode => "sms-outbound-shortcode",
            MmsInboundLongcode => "mms-inbound-longcode",
            MmsInboundShortcode => "mms-inbound-shortcode",
            MmsOutboundLongcode => "mms-outbound-longcode",
            MmsOutboundShortcode => "mms-outbound-shortcode",
            CallsInbound => "calls-inbound",
            CallsSip => "calls-sip",
            Calls => "calls",
            SmsInbound => "sms-inbound",
            SmsOutbound => "sms-outbound",
            Sms => "sms",
            MmsInbound => "mms-inbound",
            MmsOutbound => "mms-outbound",
            Mms => "mms",
            TotalPrice => "totalprice",
        }
    }

    /// Twilio's description of the category.
    pub fn description(self) -> &'static str {
        use Category::*;
        match self {
            CallsInboundLocal => "All inbound voice calls to local numbers.",
            CallsInboundMobile => "All inbound voice calls to mobile numbers.",
            CallsInboundTollfree => "All inbound voice calls to toll-free numbers.",
            CallsOutbound => "All outbound voice calls.",
            CallsSipInbound => "All inbound SIP calls.",
            CallsSipOutbound => "All outbound SIP calls.",
            CallsClient => "All TwilioClient voice calls.",
            SmsInboundLongcode => "All inbound SMS messages to long-codes.",
            SmsInboundShortcode => "All inbound SMS messages to short-codes.",
            SmsOutboundLongcode => "All outbound SMS messages from long-codes.",
            SmsOutboundShortcode => "All outbound SMS messages from short-codes.",
            MmsInboundLongcode => "All inbound MMS messages to long-codes.",
            MmsInboundShortcode => "All inbound MMS messages to short-codes.",
            MmsOutboundLongcode => "All outbound MMS messages from long-codes.",
            MmsOutboundShortcode => "All outbound MMS messages from short-codes.",
            CallsInbound => "All inbound voice calls, to mobile, toll-free and local numbers.",
            CallsSip => "All SIP calls.",
            Calls => "Inbound and outbound voice calls. Count is the number of calls and Usage is the number of minutes. Does not include client or SIP calls.",
            SmsInbound => "All inbound SMS messages, to both short-codes and long-codes.",
            SmsOutbound => "All outbound SMS messages, from both short-codes and long-codes.",
            Sms => "All SMS messages, both inbound and outbound. Count and Usage are both the number of messages sent.",
            MmsInbound => "All inbound MMS messages, to both short-codes and long-codes.",
            MmsOutbound => "All outbound MMS messages, from both short-codes and long-codes.",
            Mms => "All MMS messages, both inbound and outbound. Count and Usage are both the number of messages sent.",
            TotalPrice => "Total Price",
        }
    }

    /// The direct parent in the rollup tree; `totalprice` has none.
    ///
    /// `calls` is inbound + outbound only (Twilio: "Does not include client or SIP
    /// calls"), so `calls-sip` and `calls-client` roll up straight to `totalprice`.
    pub fn parent(self) -> Option<Category> {
        use Category::*;
        Some(match self {
            CallsInboundLocal | CallsInboundMobile | CallsInboundTollfree => CallsInbound,
            CallsInbound | CallsOutbound => Calls,
            CallsSipInbound | CallsSipOutbound => CallsSip,
            CallsSip | CallsClient | Calls => TotalPrice,
            SmsInboundLongcode | SmsInboundShortcode => SmsInbound,
            SmsOutboundLongcode | SmsOutboundShortcode => SmsOutbound,
            SmsInbound | SmsOutbound => Sms,
            MmsInboundLongcode | MmsInboundShortcode => MmsInbound,
            MmsOutboundLongcode | MmsOutboundShortcode => MmsOutbound,
            MmsInbound | MmsOutbound => Mms,
            Sms | Mms => TotalPrice,
            TotalPrice => return None,
        })
    }

    /// The leaves that roll up into this category, as a bit set over leaf indexes
    /// (a leaf's own set is just itself). A rollup's count, usage and price are the
    /// sums over these leaves.
    #[inline]
    pub fn leaf_set(self) -> u16 {
        static SETS: std::sync::LazyLock<[u16; Category::COUNT]> = std::sync::LazyLock::new(|| {
            Category::ALL.map(|cat| {
                (0..Category::LEAVES)
                    .filter(|&i| Category::ALL[i].with_ancestors().any(|c| c == cat))
                    .fold(0, |set, i| set | 1 << i)
            })
        });
        SETS[self.index()]
    }

    /// The category itself followed by every ancestor up to `totalprice`.
    pub fn with_ancestors(self) -> Ancestors {
        Ancestors { next: Some(self) }
    }

    pub fn unit(self) -> Unit {
        use Category::*;
        match self {
            TotalPrice => Unit::Price,
            CallsInboundLocal | CallsInboundMobile | CallsInboundTollfree | CallsOutbound
            | CallsSipInbound | CallsSipOutbound | CallsClient | CallsInbound | CallsSip
            | Calls => Unit::Calls,
            _ => Unit::Messages,
        }
    }

    /// Twilio's `count_unit` (empty for `totalprice`).
    pub fn count_unit(self) -> &'static str {
        match self.unit() {
            Unit::Calls => "calls",
            Unit::Messages => "messages",
            Unit::Price => "",
        }
    }

    /// Twilio's `usage_unit`; `totalprice` is measured in the account's currency.
    pub fn usage_unit(self, currency: &str) -> String {
        match self.unit() {
            Unit::Calls => "minutes".to_owned(),
            Unit::Messages => "messages".to_owned(),
            Unit::Price => currency.to_owned(),
        }
    }
}

/// Iterator over a category and its ancestors.
#[derive(Debug, Clone)]
pub struct Ancestors {
    next: Option<Category>,
}

impl Iterator for Ancestors {
    type Item = Category;
    fn next(&mut self) -> Option<Category> {
        let cur = self.next?;
        self.next = cur.parent();
        Some(cur)
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown category name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown usage category {0:?}")]
pub struct UnknownCategory(pub String);

impl FromStr for Category {
    type Err = UnknownCategory;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Category::ALL
            .iter()
            .copied()
            .find(|c| c.name() == s)
            .ok_or_else(|| UnknownCategory(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for c in Category::ALL {
            assert_eq!(c.name().parse::<Category>().unwrap(), c);
            assert_eq!(Category::from_index(c.index()), Some(c));
        }
        assert!("calls-bogus".parse::<Category>().is_err());
    }

    #[test]
    fn leaves_come_first() {
        for c in Category::ALL {
            assert_eq!(c.is_leaf(), c.index() < Category::LEAVES, "{c}");
        }
    }

    #[test]
    fn every_chain_ends_at_totalprice() {
        for c in Category::ALL {
            assert_eq!(c.with_ancestors().last(), Some(Category::TotalPrice));
            assert!(c.with_ancestors().count() <= 4);
        }
    }

    #[test]
    fn leaf_sets_follow_the_tree() {
        use Category::*;
        assert_eq!(CallsOutbound.leaf_set(), 1 << CallsOutbound.index());
        assert_eq!(TotalPrice.leaf_set(), (1 << Category::LEAVES) - 1);
        assert_eq!(Calls.leaf_set().count_ones(), 4);
        assert_eq!(
            Sms.leaf_set(),
            SmsInbound.leaf_set() | SmsOutbound.leaf_set()
        );
        assert_eq!(CallsSip.leaf_set() & Calls.leaf_set(), 0);
    }

    #[test]
    fn calls_excludes_sip_and_client() {
        let chain: Vec<_> = Category::CallsSipInbound.with_ancestors().collect();
        assert_eq!(
            chain,
            [
                Category::CallsSipInbound,
                Category::CallsSip,
                Category::TotalPrice
            ]
        );
        let chain: Vec<_> = Category::CallsClient.with_ancestors().collect();
        assert_eq!(chain, [Category::CallsClient, Category::TotalPrice]);
        let chain: Vec<_> = Category::CallsInboundMobile.with_ancestors().collect();
        assert_eq!(
            chain,
            [
                Category::CallsInboundMobile,
                Category::CallsInbound,
                Category::Calls,
                Category::TotalPrice
            ]
        );
    }

    #[test]
    fn units_match_twilio() {
        assert_eq!(Category::Calls.count_unit(), "calls");
        assert_eq!(Category::Calls.usage_unit("usd"), "minutes");
        assert_eq!(Category::Sms.usage_unit("usd"), "messages");
        assert_eq!(Category::TotalPrice.count_unit(), "");
        assert_eq!(Category::TotalPrice.usage_unit("eur"), "eur");
    }
}
