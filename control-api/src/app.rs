//! Start-up and shutdown: connect, migrate, sync pools, start the publisher, the reconciler
//! and the HTTP server. `main.rs` and the tests both start the API through here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::db::{self, gpus, ports, Db};
use crate::docker::DockerClient;
use crate::metrics::Metrics;
use crate::routes::{Publisher, PublisherStatus, Resync, TableView};
use crate::state::{AppState, State};

/// What to run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The API with its publisher (if enabled) and reconciler.
    Api {
        /// Run a publisher in this process (it stands by if another holds the table).
        publisher: bool,
    },
    /// Only the publisher (a gateway host without an API).
    PublishOnly,
}

/// A started process; [`Running::shutdown`] stops it.
pub struct Running {
    /// Where the HTTP API listens (API mode).
    pub addr: Option<SocketAddr>,
    /// The shared state (API mode).
    pub state: Option<AppState>,
    /// The publisher's status.
    pub publisher: Arc<PublisherStatus>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Signals every task to stop and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Holds this instance's liveness lock on a dedicated connection for the life of the process,
/// re-taking it if the connection drops.
async fn hold_liveness(db: Db, instance: i32, mut shutdown: watch::Receiver<bool>) {
    loop {
        let mut conn = match db.dedicated().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "liveness connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        match db::hold_instance_lock(&mut conn, instance).await {
            Ok(true) => {}
            Ok(false) => tracing::error!(instance, "instance id already locked; liveness unknown"),
            Err(e) => tracing::error!(error = %e, "taking the liveness lock"),
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    if sqlx::query("SELECT 1").execute(&mut conn).await.is_err() {
                        tracing::warn!("liveness connection lost; reconnecting");
                        break;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Starts everything for `mode`. In API mode the HTTP server is bound to `cfg.listen`
/// (port 0 picks a free port; see [`Running::addr`]).
pub async fn start(cfg: Config, mode: Mode) -> anyhow::Result<Running> {
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    if cfg.database_url.is_empty() {
        anyhow::bail!("no database configured: set DATABASE_URL or database_url");
    }
    let cfg = Arc::new(cfg);
    let db = Db::connect(&cfg).await.context("connecting to PostgreSQL")?;
    db.migrate().await.context("applying database migrations")?;
    let metrics = Metrics::new();
    let status = Arc::new(PublisherStatus::default());
    let resync = Resync::default();
    let (tx, rx) = watch::channel(false);
    let mut tasks = vec![];

    let run_publisher = matches!(mode, Mode::PublishOnly | Mode::Api { publisher: true });
    if run_publisher {
        let p = Publisher::new(db.clone(), &cfg.route_table, metrics.clone(), status.clone(), resync.clone());
        tasks.push(tokio::spawn(p.run(rx.clone())));
    }

    if mode == Mode::PublishOnly {
        // Without an API there is no reconciler; re-sync the table every interval instead.
        let resync = resync.clone();
        let interval = Duration::from_secs(cfg.reconcile_interval_s);
        let mut stop = rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => resync.request(),
                    _ = stop.changed() => return,
                }
            }
        }));
        return Ok(Running { addr: None, state: None, publisher: status, shutdown: tx, tasks });
    }

    let report = ports::sync_pools(&db, &cfg).await.context("synchronising port pools")?;
    tracing::info!(?report, "port pools synchronised");
    gpus::sync_inventory(&db, &cfg.gpu.devices).await.context("synchronising the GPU inventory")?;
    let docker = DockerClient::connect(&cfg).await.context("connecting to Docker")?;

    let instance = crate::ids::instance_id();
    tasks.push(tokio::spawn(hold_liveness(db.clone(), instance, rx.clone())));

    let state: AppState = Arc::new(State {
        cfg: cfg.clone(),
        db,
        docker,
        metrics,
        table: Arc::new(TableView::new(&cfg.route_table)),
        publisher: status.clone(),
        resync,
        instance: i64::from(instance),
    });
    tasks.push(tokio::spawn(crate::reconcile::run(
        state.clone(),
        Duration::from_secs(cfg.reconcile_interval_s),
        rx.clone(),
    )));

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let app = crate::http::router(state.clone());
    let mut stop = rx.clone();
    tasks.push(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));
    tracing::info!(%addr, instance, "gpugate-api listening");
    Ok(Running { addr: Some(addr), state: Some(state), publisher: status, shutdown: tx, tasks })
}
