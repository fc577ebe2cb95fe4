//! Helpers of `scripts/bench-e2e.sh` for the usage-trigger runs.
//!
//! - `trigger_bench seed STORE_URL ACCOUNTS PER_ACCOUNT CALLBACK_URL`: creates
//!   the generator's accounts (`tallyd generate --accounts ACCOUNTS`, default
//!   seed) in the store with PER_ACCOUNT usage triggers each: a daily `sms`
//!   count trigger at 20 (fires for busy accounts), then monthly `calls` usage
//!   and all-time `totalprice` price triggers that never fire (evaluated on
//!   every flush all the same).
//! - `trigger_bench seed STORE_URL ACCOUNTS PER_ACCOUNT CALLBACK_URL FIRINGS_PER_SEC RATE CDRS`:
//!   the same, but each account's daily `sms` count trigger is set so that
//!   the accounts cross one after another, FIRINGS_PER_SEC a second from the
//!   stream's second second on, whatever the CDR rate: the seed replays the
//!   stream `tallyd generate --count CDRS --rate RATE --accounts ACCOUNTS
//!   --late-rate 0` produces (the generator is deterministic) and gives each
//!   account the count of `sms` CDRs it has when its turn comes. An account
//!   whose turn is past the stream's end never fires.
//! - `trigger_bench sink PORT`: an HTTP receiver that answers 200 to every
//!   callback, as fast as it can.

use std::net::SocketAddr;

use rust_decimal::Decimal;
use tallyd::api::accounts::{self, Account};
use tallyd::category::Category;
use tallyd::generate::{Generator, GeneratorSettings};
use tallyd::store::Store;
use tallyd::triggers::{CallbackMethod, Recurring, Trigger, TriggerBy};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("seed") if args.len() == 6 || args.len() == 9 => seed(
            &args[2],
            args[3].parse().expect("ACCOUNTS"),
            args[4].parse().expect("PER_ACCOUNT"),
            &args[5],
            args.get(6).map(|f| Staggered {
                firings_per_sec: f.parse().expect("FIRINGS_PER_SEC"),
                rate: args[7].parse().expect("RATE"),
                cdrs: args[8].parse().expect("CDRS"),
            }),
        ),
        Some("sink") if args.len() == 3 => sink(args[2].parse().expect("PORT")),
        _ => {
            eprintln!(
                "usage: trigger_bench seed STORE_URL ACCOUNTS PER_ACCOUNT CALLBACK_URL [FIRINGS_PER_SEC RATE CDRS] | trigger_bench sink PORT"
            );
            std::process::exit(2);
        }
    }
}

/// Trigger values that make the accounts cross one after another.
struct Staggered {
    firings_per_sec: f64,
    /// Messages per second of the stream.
    rate: f64,
    /// Messages in the stream.
    cdrs: usize,
}

impl Staggered {
    /// Each account's daily `sms` count trigger value: the account's `sms`
    /// CDRs in the stream up to its turn (account `i` crosses at the
    /// `(1 + i / firings_per_sec)`-th second of the stream: one second in,
    /// then `firings_per_sec` a second), or out of reach if its turn is
    /// past the end.
    fn values(&self, generator: Generator) -> Vec<u64> {
        let n = generator.accounts().len();
        let index: std::collections::HashMap<String, usize> = generator
            .accounts()
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i))
            .collect();
        // The turns as positions in the stream.
        let turn = |i: usize| ((1.0 + i as f64 / self.firings_per_sec) * self.rate) as usize;
        let sms = Category::Sms.leaf_set();
        let mut counts = vec![0u64; n];
        let mut values = vec![u64::MAX; n];
        let mut seen = std::collections::HashSet::new();
        for (at, g) in generator.take(self.cdrs).enumerate() {
            let Ok(cdr) = tallyd::cdr::decode(&g.payload) else {
                continue;
            };
            // Duplicates count once.
            if sms & (1 << cdr.leaf().index()) == 0 || !seen.insert(g.payload.clone()) {
                continue;
            }
            let i = index[&g.key];
            counts[i] += 1;
            if values[i] == u64::MAX && at >= turn(i) {
                values[i] = counts[i];
            }
        }
        values
    }
}

fn seed(url: &str, n: usize, per_account: usize, callback: &str, staggered: Option<Staggered>) {
    let store = Store::open(url).expect("store");
    let settings = GeneratorSettings {
        accounts: n,
        ..GeneratorSettings::default()
    };
    let generator = Generator::new(settings.clone());
    let values = staggered.map(|s| {
        s.values(Generator::new(GeneratorSettings {
            late_rate: 0.0,
            ..settings
        }))
    });
    let now = accounts::now_rfc3339();
    let kinds = [
        ("sms", TriggerBy::Count, Decimal::from(20), Recurring::Daily),
        (
            "calls",
            TriggerBy::Usage,
            Decimal::from(1_000_000),
            Recurring::Monthly,
        ),
        (
            "totalprice",
            TriggerBy::Price,
            Decimal::from(1_000_000),
            Recurring::AllTime,
        ),
    ];
    let mut made = 0;
    store
        .with_conn(|c| {
            c.transaction(|c| {
                for (i, sid) in generator.accounts().iter().enumerate() {
                    accounts::upsert(
                        c,
                        &Account {
                            sid: sid.clone(),
                            auth_token: tallyd::config::Secret::new(format!("bench-token-{i:08}")),
                            parent_sid: None,
                            friendly_name: sid.clone(),
                            plan: None,
                            limits: Default::default(),
                            created_at: now.clone(),
                            updated_at: now.clone(),
                        },
                    )?;
                    for k in 0..per_account {
                        let (category, by, mut value, recurring) = kinds[k % kinds.len()];
                        if let (0, Some(values)) = (k, &values) {
                            value = Decimal::from(values[i]);
                        }
                        c.insert_trigger(&Trigger {
                            sid: format!("UT{:016x}{:016x}", i, k),
                            account_sid: sid.clone(),
                            friendly_name: String::new(),
                            usage_category: category.into(),
                            trigger_by: by,
                            trigger_value: value,
                            recurring,
                            callback_url: callback.into(),
                            callback_method: CallbackMethod::Post,
                            date_created: "2000-01-01T00:00:00Z".into(),
                            date_updated: "2000-01-01T00:00:00Z".into(),
                            date_fired: None,
                            fired_period: None,
                            fired_value: None,
                        })?;
                        made += 1;
                    }
                }
                Ok(())
            })
        })
        .expect("seeding");
    eprintln!("{made} triggers on {n} accounts");
}

fn sink(port: u16) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let app = axum::Router::new().fallback(|| async { "" });
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("bind");
        axum::serve(listener, app).await.expect("serve");
    });
}
