//! One store connection, SQLite or PostgreSQL, and the one way to query it.
//!
//! One SQL text serves both databases: `$n` placeholders (rewritten `?n` for
//! SQLite, so they may appear in any order and more than once), `CAST(… AS
//! BIGINT)` around aggregates, `ON CONFLICT` upserts. What differs between the
//! databases — opening a connection, bulk page writes, checkpoints — is in
//! [`super::sqlite`] and [`super::pg`]; everything else is written once on top of
//! [`Conn::query`], [`Conn::execute`] and [`Conn::transaction`].

use std::collections::HashMap;

use super::{Backend, Result};

/// A bound query parameter.
#[derive(Debug, Clone)]
pub enum Param<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    Bytes(&'a [u8]),
}

/// A value read from a row: text, integer, bytes or NULL.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
    Null,
}

impl Value {
    pub fn text(&self) -> &str {
        match self {
            Value::Text(s) => s,
            _ => "",
        }
    }
    pub fn opt_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
    pub fn int(&self) -> i64 {
        match self {
            Value::Int(i) => *i,
            Value::Text(s) => s.parse().unwrap_or(0),
            Value::Bytes(_) | Value::Null => 0,
        }
    }
    pub fn opt_int(&self) -> Option<i64> {
        match self {
            Value::Null => None,
            v => Some(v.int()),
        }
    }
    pub fn bytes(&self) -> &[u8] {
        match self {
            Value::Bytes(b) => b,
            Value::Text(s) => s.as_bytes(),
            _ => &[],
        }
    }
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Value::Bytes(b) => b,
            Value::Text(s) => s.into_bytes(),
            _ => Vec::new(),
        }
    }
}

/// `$first, $first+1, …`: `n` placeholders for an `IN (…)` list.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `sql` with its `$N` placeholders written `?N` for SQLite, outside quoted
/// text. SQLite takes `$N` as a named parameter and looks each one up among
/// those seen before: quadratic in a statement's parameters, and parsing one
/// flush's outbox insert (1000 rows × 9 parameters) cost more than running it.
fn sqlite_numbered(sql: &str) -> std::borrow::Cow<'_, str> {
    if !sql.contains('$') {
        return std::borrow::Cow::Borrowed(sql);
    }
    // By bytes: `$`, `'` and digits are ASCII, so each `$` is a char
    // boundary and the text between them is copied whole (this runs for
    // every statement, the hold writer's many small ones included).
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let (mut quoted, mut copied) = (false, 0);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' => quoted = !quoted,
            b'$' if !quoted && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                out.push_str(&sql[copied..i]);
                out.push('?');
                copied = i + 1;
            }
            _ => {}
        }
    }
    out.push_str(&sql[copied..]);
    std::borrow::Cow::Owned(out)
}

/// One open connection.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<PgConn>),
}

/// A PostgreSQL client and the statements it has prepared, so a repeated query
/// costs one round trip and no planning of its text.
pub struct PgConn {
    pub(super) client: postgres::Client,
    statements: HashMap<String, postgres::Statement>,
}

/// Distinct statements kept per connection (IN lists of different lengths are
/// different statements); the cache is emptied when it is full.
const STATEMENT_CACHE: usize = 256;

impl PgConn {
    pub(super) fn new(client: postgres::Client) -> PgConn {
        PgConn {
            client,
            statements: HashMap::new(),
        }
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

impl Conn {
    /// Opens a connection the one way every part of tallyd does (see
    /// [`super::sqlite::open`], [`super::pg::open`]). No migrations: they run
    /// once, at start ([`super::Store::migrate`]).
    pub(super) fn open(backend: &Backend) -> Result<Conn> {
        match backend {
            Backend::Sqlite(path) => super::sqlite::open(path).map(Conn::Sqlite),
            Backend::Postgres(cfg) => {
                super::pg::open(cfg).map(|c| Conn::Postgres(Box::new(PgConn::new(c))))
            }
        }
    }

    /// Runs a statement returning rows.
    pub fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Vec<Value>>> {
        match self {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(&sqlite_numbered(sql))?;
                let n = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(sq)))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let mut vals = Vec::with_capacity(n);
                    for i in 0..n {
                        use rusqlite::types::ValueRef;
                        vals.push(match row.get_ref(i)? {
                            ValueRef::Null => Value::Null,
                            ValueRef::Integer(v) => Value::Int(v),
                            ValueRef::Real(v) => Value::Int(v as i64),
                            ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
                        });
                    }
                    out.push(vals);
                }
                Ok(out)
            }
            Conn::Postgres(c) => {
                let stmt = c.statement(sql)?;
                let owned = pg_params(params, stmt.params());
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    owned.iter().map(|b| b.as_ref()).collect();
                let rows = c.client.query(&stmt, &refs)?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let mut vals = Vec::with_capacity(row.len());
                    for (i, col) in row.columns().iter().enumerate() {
                        use postgres::types::Type;
                        let t = col.type_();
                        vals.push(if *t == Type::INT8 {
                            row.get::<_, Option<i64>>(i).map_or(Value::Null, Value::Int)
                        } else if *t == Type::INT4 {
                            row.get::<_, Option<i32>>(i)
                                .map_or(Value::Null, |v| Value::Int(v as i64))
                        } else if *t == Type::BYTEA {
                            row.get::<_, Option<Vec<u8>>>(i)
                                .map_or(Value::Null, Value::Bytes)
                        } else {
                            row.get::<_, Option<String>>(i)
                                .map_or(Value::Null, Value::Text)
                        });
                    }
                    out.push(vals);
                }
                Ok(out)
            }
        }
    }

    /// Runs a statement without rows; returns the number of rows changed.
    pub fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        match self {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(&sqlite_numbered(sql))?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter().map(sq)))? as u64)
            }
            Conn::Postgres(c) => {
                let stmt = c.statement(sql)?;
                let owned = pg_params(params, stmt.params());
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    owned.iter().map(|b| b.as_ref()).collect();
                Ok(c.client.execute(&stmt, &refs)?)
            }
        }
    }

    /// Runs `f` in a transaction, committing if it returns `Ok`. SQLite takes
    /// the write lock at the start (`BEGIN IMMEDIATE`), so two writers queue on
    /// the busy timeout instead of failing when a reader upgrades.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        self.batch(match self {
            Conn::Sqlite(_) => "BEGIN IMMEDIATE",
            Conn::Postgres(_) => "BEGIN",
        })?;
        match f(self) {
            Ok(v) => {
                self.batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Runs `f` with its commits synced to disk before they return: for a
    /// write that nothing could replay (a top-up is in no CDR), so its answer
    /// survives a power loss too. SQLite's connections otherwise commit with
    /// `synchronous = NORMAL` (a commit survives the process's crash; the WAL
    /// is synced at checkpoints); PostgreSQL commits are synced already.
    pub fn synced<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let Conn::Sqlite(c) = self else {
            return f(self);
        };
        c.pragma_update(None, "synchronous", "FULL")?;
        let result = f(self);
        if let Conn::Sqlite(c) = self {
            c.pragma_update(None, "synchronous", "NORMAL")?;
        }
        result
    }

    /// Runs statements without parameters or rows.
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Conn::Sqlite(c) => c.execute_batch(sql)?,
            Conn::Postgres(c) => c.client.batch_execute(sql)?,
        }
        Ok(())
    }

    /// `clause` — a row lock (`FOR SHARE`, `FOR UPDATE`, with the `ORDER BY`
    /// that takes the locks in a fixed order) — on PostgreSQL; nothing on
    /// SQLite, whose write transaction already holds the database's one
    /// write lock.
    pub fn row_lock(&self, clause: &'static str) -> &'static str {
        match self {
            Conn::Postgres(_) => clause,
            Conn::Sqlite(_) => "",
        }
    }

    /// Whether the connection is known to be unusable (a PostgreSQL connection
    /// the server closed).
    pub fn is_broken(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres(c) => c.client.is_closed(),
        }
    }

    /// Whether the connection still works: a PostgreSQL connection answers an
    /// empty query within a second.
    pub fn is_alive(&mut self) -> bool {
        match self {
            Conn::Sqlite(_) => true,
            Conn::Postgres(c) => c.client.is_valid(std::time::Duration::from_secs(1)).is_ok(),
        }
    }

    /// Leaves copying a SQLite store's WAL into its file to
    /// [`super::checkpoint::Checkpointer`] instead of this connection's commits.
    /// (No-op for PostgreSQL.)
    pub fn defer_checkpoints(&mut self) -> Result<()> {
        if let Conn::Sqlite(c) = self {
            c.pragma_update(None, "wal_autocheckpoint", 0)?;
        }
        Ok(())
    }

    /// Copies what is committed in a SQLite store's WAL into its file, without
    /// waiting for readers or the writer. (No-op for PostgreSQL.)
    pub fn checkpoint(&mut self) -> Result<()> {
        if let Conn::Sqlite(c) = self {
            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        }
        Ok(())
    }
}

fn sq<'a>(p: &'a Param<'a>) -> rusqlite::types::ToSqlOutput<'a> {
    use rusqlite::types::{ToSqlOutput, ValueRef};
    match p {
        Param::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        Param::OptText(Some(s)) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        Param::OptText(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        Param::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
        Param::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
    }
}

/// The parameters as PostgreSQL takes them: an integer goes as the type the
/// statement expects (`INTEGER` columns take an `i32`).
fn pg_params(
    params: &[Param<'_>],
    types: &[postgres::types::Type],
) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    use postgres::types::Type;
    params
        .iter()
        .enumerate()
        .map(|(i, p)| -> Box<dyn postgres::types::ToSql + Sync> {
            match p {
                Param::Text(s) => Box::new(s.to_string()),
                Param::OptText(s) => Box::new(s.map(str::to_owned)),
                Param::Int(v) if types.get(i) == Some(&Type::INT4) => {
                    // Partitions and days, which always fit.
                    Box::new(i32::try_from(*v).unwrap_or(i32::MAX))
                }
                Param::Int(v) => Box::new(*v),
                Param::Bytes(b) => Box::new(b.to_vec()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::sqlite_numbered;

    #[test]
    fn sqlite_placeholders_are_numbered_outside_quotes() {
        assert_eq!(
            sqlite_numbered("SELECT '$1', $1, $10 FROM t WHERE a = $2 AND b = 'x$3'"),
            "SELECT '$1', ?1, ?10 FROM t WHERE a = ?2 AND b = 'x$3'"
        );
        assert_eq!(sqlite_numbered("SELECT 1"), "SELECT 1");
        assert_eq!(
            sqlite_numbered("SELECT 'é$1', $1 AS ü, $2"),
            "SELECT 'é$1', ?1 AS ü, ?2",
            "text around the placeholders is kept whole"
        );
    }
}
