//! Checkpoints of a SQLite store's write-ahead log, on a thread of their own.
//!
//! SQLite copies the WAL into the database file ("auto-checkpoint") inside the
//! statement that commits once the WAL passes 1000 pages, so a flush's commit
//! paid for copying earlier flushes: after a backlog drain, 130–140 ms of a 0.9 s
//! final flush. Every connection of a SQLite store turns that off
//! ([`super::Conn::defer_checkpoints`], done when it is opened), and
//! [`super::Store::write_flush`] asks this thread, after every flush that
//! landed, to run a PASSIVE checkpoint on its own connection: it copies what is
//! committed without blocking the writer or readers. What a commit wrote is
//! durable in the WAL either way. The same request checkpoints the store's
//! holds file ([`super::holds`]): the hold writer's commits leave their WAL
//! here too, since a checkpoint inside a hold's commit (and its fsyncs) made
//! that hold and every one behind it wait.

use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread::JoinHandle;

use super::{Backend, Conn};

pub struct Checkpointer {
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread for the SQLite store at `backend`.
    pub(super) fn start(backend: Backend) -> super::Result<Checkpointer> {
        // One pending request is enough: a checkpoint copies everything committed.
        let (wake, requests) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("tallyd-checkpoint".into())
            .spawn(move || {
                let mut conn: Option<Conn> = None;
                let mut holds: Option<Conn> = None;
                for () in requests {
                    conn = checkpoint(conn.take(), || Conn::open(&backend));
                    if let Backend::Sqlite(path) = &backend {
                        holds = checkpoint(holds.take(), || super::holds::open(path));
                    }
                }
            })
            .map_err(|e| super::Error::Task(format!("starting the WAL checkpoint thread: {e}")))?;
        Ok(Checkpointer {
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Asks for a checkpoint (one is run soon; never blocks).
    pub fn request(&self) {
        if let Some(w) = &self.wake {
            match w.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {
                    tracing::warn!("WAL checkpoint thread is gone")
                }
            }
        }
    }
}

/// Checkpoints with `conn`, or a new connection from `open`; returns the
/// connection to keep (none after a failure).
fn checkpoint(conn: Option<Conn>, open: impl FnOnce() -> super::Result<Conn>) -> Option<Conn> {
    match conn
        .map_or_else(open, Ok)
        .and_then(|mut c| c.checkpoint().map(|()| c))
    {
        Ok(c) => Some(c),
        // The next flush asks again; until then the WAL grows.
        Err(e) => {
            tracing::warn!(error = %e, "WAL checkpoint failed");
            None
        }
    }
}

impl Drop for Checkpointer {
    /// Lets a requested checkpoint finish.
    fn drop(&mut self) {
        self.wake = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
