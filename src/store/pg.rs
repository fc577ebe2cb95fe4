//! The PostgreSQL side of the store: migrations and the flush, streamed with a
//! binary COPY into staging tables and upserted from there.

use crate::dedup::blob;

use super::schema::{self, leaf_values, LEAF_COLUMN_COUNT, LEAF_COLUMN_LIST};
use super::{
    period_start, stale_advance, upsert_rows, FlushBatch, FlushOutcome, Result, BREAKDOWN_COLUMNS,
    SET_LAST_FLUSH, UPSERT_BREAKDOWN_TAIL,
};

/// Creates or updates the tables of a PostgreSQL store; idempotent, and
/// serialised between instances that start at once.
pub fn migrate_postgres(c: &mut postgres::Client) -> Result<(), postgres::Error> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7461726)", &[])?;
    for m in schema::migrations(true) {
        tx.batch_execute(m)?;
    }
    tx.commit()
}

/// Opens a binary COPY of `columns` (of `types`) into `{table}_in`, a
/// session-local staging copy of `table` emptied at each commit.
fn stage<'t>(
    tx: &'t mut postgres::Transaction<'_>,
    table: &str,
    columns: &str,
    types: &[postgres::types::Type],
) -> Result<postgres::binary_copy::BinaryCopyInWriter<'t>> {
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {table}_in (LIKE {table}) ON COMMIT DELETE ROWS"
    ))?;
    let sink = tx.copy_in(&format!("COPY {table}_in ({columns}) FROM STDIN BINARY"))?;
    Ok(postgres::binary_copy::BinaryCopyInWriter::new(sink, types))
}

/// Adds the batch's rows into `usage_rows`: streamed with a binary COPY into a
/// session-local staging table, then upserted from there in one statement (COPY
/// is PostgreSQL's cheapest way in; parameters and arrays cost twice as much).
fn copy_rows(tx: &mut postgres::Transaction<'_>, b: &FlushBatch) -> Result<()> {
    use postgres::types::Type;
    if b.rows.is_empty() {
        return Ok(());
    }
    let columns = format!(
        "account_sid, period, start_date, price_unit, {}",
        *LEAF_COLUMN_LIST
    );
    let types: Vec<Type> = [Type::TEXT; 4]
        .into_iter()
        .chain(std::iter::repeat(Type::INT8).take(LEAF_COLUMN_COUNT))
        .collect();
    let mut w = stage(tx, "usage_rows", &columns, &types)?;
    let mut values: Vec<i64> = Vec::with_capacity(LEAF_COLUMN_COUNT);
    for r in &b.rows {
        let mut sid = [0; 34];
        let account = r.key.account.write_text(&mut sid);
        let start = period_start(r.key.period);
        let start: &str = &start;
        let kind = r.key.period.kind();
        values.clear();
        values.extend(leaf_values(&r.leaves));
        let mut row: Vec<&(dyn postgres::types::ToSql + Sync)> =
            vec![&account, &kind, &start, &r.price_unit];
        row.extend(
            values
                .iter()
                .map(|v| v as &(dyn postgres::types::ToSql + Sync)),
        );
        w.write(&row)?;
    }
    w.finish()?;
    tx.batch_execute(&upsert_rows(&format!(
        "SELECT {columns} FROM usage_rows_in"
    )))?;
    Ok(())
}

/// Adds the batch's breakdowns into `usage_breakdowns`, the way [`copy_rows`] does.
fn copy_breakdowns(tx: &mut postgres::Transaction<'_>, b: &FlushBatch) -> Result<()> {
    use postgres::types::Type;
    if b.breakdowns.is_empty() {
        return Ok(());
    }
    let types = [
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::INT8,
    ];
    let mut w = stage(tx, "usage_breakdowns", BREAKDOWN_COLUMNS, &types)?;
    for d in &b.breakdowns {
        let k = &d.key;
        let t = [d.calls, d.messages];
        let [cc, cu, cp, mc, mu, mp] = [
            t[0].count as i64,
            t[0].usage as i64,
            t[0].price,
            t[1].count as i64,
            t[1].usage as i64,
            t[1].price,
        ];
        w.write(&[
            &k.account.write_text(&mut [0; 34]),
            &k.dimension.as_str(),
            &&*k.value,
            &&*k.day.text(),
            &cc,
            &cu,
            &cp,
            &mc,
            &mu,
            &mp,
        ])?;
    }
    w.finish()?;
    tx.batch_execute(&format!(
        "INSERT INTO usage_breakdowns ({BREAKDOWN_COLUMNS}) SELECT {BREAKDOWN_COLUMNS} FROM usage_breakdowns_in {UPSERT_BREAKDOWN_TAIL}"
    ))?;
    Ok(())
}

/// Writes one flush share in one transaction (what it holds: [`crate::store`]).
pub(super) fn flush(c: &mut postgres::Client, b: &FlushBatch) -> Result<FlushOutcome> {
    let mut tx = c.transaction()?;
    for (i, o) in b.offsets.iter().enumerate() {
        let moved = match o.from {
            None => tx.execute(
                "INSERT INTO consumer_offsets (topic, partition, next_offset) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&o.topic, &o.partition, &o.to],
            )?,
            Some(from) => tx.execute(
                "UPDATE consumer_offsets SET next_offset = $3 WHERE topic = $1 AND partition = $2 AND next_offset = $4",
                &[&o.topic, &o.partition, &o.to, &from],
            )?,
        };
        if moved == 0 {
            let found: Option<i64> = tx
                .query_opt(
                    "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = $2",
                    &[&o.topic, &o.partition],
                )?
                .map(|r| r.get(0));
            return stale_advance(o, found, i == 0);
        }
    }
    let started = std::time::Instant::now();
    copy_rows(&mut tx, b)?;
    let rows_done = started.elapsed();
    copy_breakdowns(&mut tx, b)?;
    tracing::debug!(
        rows = b.rows.len(),
        rows_ms = rows_done.as_millis() as u64,
        breakdowns = b.breakdowns.len(),
        breakdowns_ms = (started.elapsed() - rows_done).as_millis() as u64,
        "postgres flush written"
    );
    for d in &b.dedup {
        tx.execute(
            "INSERT INTO dedup_batches (topic, partition, seen_day, first_offset, ids) VALUES ($1, $2, $3, $4, $5)",
            &[
                &d.topic,
                &d.partition,
                &d.seen_day.0,
                &d.first_offset,
                &&*blob(&d.ids),
            ],
        )?;
    }
    if let Some(before) = b.prune_dedup_before {
        tx.execute(
            "DELETE FROM dedup_batches WHERE seen_day < $1",
            &[&before.0],
        )?;
    }
    tx.execute(SET_LAST_FLUSH, &[&b.as_of])?;
    tx.commit()?;
    Ok(FlushOutcome::Applied)
}
