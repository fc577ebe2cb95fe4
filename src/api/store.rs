//! The API's own small store layer: a bounded pool of blocking SQLite or
//! PostgreSQL connections opened from `store.url`, and the queries the handlers
//! need. One SQL text serves both databases (`$n` placeholders in order of first
//! use, `CAST(… AS BIGINT)` around aggregates), so every query is written once.
//!
//! Handlers call [`ApiStore::run`], which waits for a permit (the pool size bounds
//! concurrent queries), then runs the closure on tokio's blocking pool.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Semaphore;

/// What went wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store.url {url:?} is not sqlite://PATH or postgres://…")]
    BadUrl { url: String },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("usage page {page:?} of {account}: {reason}")]
    Page {
        account: String,
        page: String,
        reason: crate::store::page::PageError,
    },
    #[error("migrating the store: {0}")]
    Migrate(#[from] crate::store::Error),
    #[error("store task failed: {0}")]
    Task(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone)]
enum Backend {
    Sqlite(PathBuf),
    Postgres(Box<postgres::Config>),
}

/// A bound query parameter.
#[derive(Debug, Clone)]
pub enum Param<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
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
    pub fn bytes(&self) -> &[u8] {
        match self {
            Value::Bytes(b) => b,
            Value::Text(s) => s.as_bytes(),
            _ => &[],
        }
    }
}

/// One open connection.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<PgConn>),
}

/// A PostgreSQL client and the statements it has prepared, so a repeated query
/// costs one round trip and no planning of its text.
pub struct PgConn {
    client: postgres::Client,
    statements: std::collections::HashMap<String, postgres::Statement>,
}

/// Distinct statements kept per connection (IN lists of different lengths are
/// different statements); the cache is emptied when it is full.
const STATEMENT_CACHE: usize = 256;

impl PgConn {
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
    /// Runs a statement returning rows.
    pub fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Vec<Value>>> {
        match self {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
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
                let owned: Vec<Box<dyn postgres::types::ToSql + Sync>> =
                    params.iter().map(pg).collect();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    owned.iter().map(|b| b.as_ref()).collect();
                let stmt = c.statement(sql)?;
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
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter().map(sq)))? as u64)
            }
            Conn::Postgres(c) => {
                let owned: Vec<Box<dyn postgres::types::ToSql + Sync>> =
                    params.iter().map(pg).collect();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    owned.iter().map(|b| b.as_ref()).collect();
                let stmt = c.statement(sql)?;
                Ok(c.client.execute(&stmt, &refs)?)
            }
        }
    }

    /// Runs `f` in a transaction, committing if it returns `Ok`.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        self.batch("BEGIN")?;
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

    fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Conn::Sqlite(c) => c.execute_batch(sql)?,
            Conn::Postgres(c) => c.client.batch_execute(sql)?,
        }
        Ok(())
    }

    fn is_broken(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres(c) => c.client.is_closed(),
        }
    }
}

fn sq<'a>(p: &'a Param<'a>) -> rusqlite::types::ToSqlOutput<'a> {
    use rusqlite::types::{ToSqlOutput, ValueRef};
    match p {
        Param::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        Param::OptText(Some(s)) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        Param::OptText(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        Param::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
    }
}

fn pg(p: &Param<'_>) -> Box<dyn postgres::types::ToSql + Sync> {
    match p {
        Param::Text(s) => Box::new(s.to_string()),
        Param::OptText(s) => Box::new(s.map(str::to_owned)),
        Param::Int(i) => Box::new(*i),
    }
}

/// A bounded pool of store connections for the HTTP API.
#[derive(Clone)]
pub struct ApiStore {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a sync postgres client runs a small runtime of its own, which
        // panics on a tokio worker; the last state may well be dropped on one.
        let conns = std::mem::take(self.idle.get_mut());
        if !conns.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(conns)).join();
        }
    }
}

impl ApiStore {
    /// Parses `sqlite://PATH` or `postgres://…` (also `postgresql://…`); connects
    /// lazily.
    pub fn new(url: &str, pool_size: usize) -> Result<ApiStore> {
        let backend = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::BadUrl {
                    url: crate::config::redact_url(url),
                });
            }
            Backend::Sqlite(PathBuf::from(path))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres(Box::new(postgres::Config::from_str(url).map_err(|_| {
                StoreError::BadUrl {
                    url: crate::config::redact_url(url),
                }
            })?))
        } else {
            return Err(StoreError::BadUrl {
                url: crate::config::redact_url(url),
            });
        };
        Ok(ApiStore {
            inner: Arc::new(Inner {
                backend,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(pool_size.max(1)),
            }),
        })
    }

    fn connect(&self) -> Result<Conn> {
        match &self.inner.backend {
            Backend::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    let _ = std::fs::create_dir_all(dir);
                }
                let c = rusqlite::Connection::open(path)?;
                // WAL lets the flush writer and API readers work at once.
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                Ok(Conn::Sqlite(c))
            }
            Backend::Postgres(cfg) => Ok(Conn::Postgres(Box::new(PgConn {
                client: cfg.connect(postgres::NoTls)?,
                statements: Default::default(),
            }))),
        }
    }

    /// Runs `f` with a pooled connection, synchronously (for start-up and tests).
    pub fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let taken = self.inner.idle.lock().pop();
        let mut conn = match taken {
            Some(c) => c,
            None => self.connect()?,
        };
        let out = f(&mut conn);
        if !conn.is_broken() {
            self.inner.idle.lock().push(conn);
        }
        out
    }

    /// Runs `f` on the blocking pool once a connection permit is free.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with_conn(f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Creates the tables if they do not exist (every migration is idempotent).
    pub fn migrate(&self) -> Result<()> {
        self.with_conn(|c| {
            match c {
                Conn::Sqlite(c) => crate::store::migrate_sqlite(c)?,
                Conn::Postgres(c) => crate::store::migrate_postgres(&mut c.client)?,
            }
            Ok(())
        })
    }
}
