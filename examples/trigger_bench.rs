//! Helpers of `scripts/bench-e2e.sh` for the usage-trigger runs.
//!
//! - `trigger_bench seed STORE_URL ACCOUNTS PER_ACCOUNT CALLBACK_URL`: creates
//!   the generator's accounts (`tallyd generate --accounts ACCOUNTS`, default
//!   seed) in the store with PER_ACCOUNT usage triggers each: a daily `sms`
//!   count trigger at 20 (fires for busy accounts), then monthly `calls` usage
//!   and all-time `totalprice` price triggers that never fire (evaluated on
//!   every flush all the same).
//! - `trigger_bench sink PORT`: an HTTP receiver that answers 200 to every
//!   callback, as fast as it can.

use std::net::SocketAddr;

use rust_decimal::Decimal;
use tallyd::api::accounts::{self, Account};
use tallyd::generate::{Generator, GeneratorSettings};
use tallyd::store::Store;
use tallyd::triggers::{CallbackMethod, Recurring, Trigger, TriggerBy};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("seed") if args.len() == 6 => seed(
            &args[2],
            args[3].parse().expect("ACCOUNTS"),
            args[4].parse().expect("PER_ACCOUNT"),
            &args[5],
        ),
        Some("sink") if args.len() == 3 => sink(args[2].parse().expect("PORT")),
        _ => {
            eprintln!(
                "usage: trigger_bench seed STORE_URL ACCOUNTS PER_ACCOUNT CALLBACK_URL | trigger_bench sink PORT"
            );
            std::process::exit(2);
        }
    }
}

fn seed(url: &str, n: usize, per_account: usize, callback: &str) {
    let store = Store::open(url).expect("store");
    let generator = Generator::new(GeneratorSettings {
        accounts: n,
        ..GeneratorSettings::default()
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
                        let (category, by, value, recurring) = kinds[k % kinds.len()];
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
