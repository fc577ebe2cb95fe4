//! Mounts the usage APIs on the daemon's router. (The APIs land in `crate::api`.)

use crate::config::Config;

pub fn mount(
    app: axum::Router,
    _cfg: &Config,
    _rt: &tokio::runtime::Runtime,
) -> anyhow::Result<axum::Router> {
    Ok(app)
}
