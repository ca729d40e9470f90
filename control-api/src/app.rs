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
use crate::ops::{Liveness, Operations};
use crate::publisher_status::PublisherStatus;
use crate::publisher::{Publisher, Resync};
use crate::table_view::TableView;
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
    /// Where the HTTP API listens (API mode), or the publisher's probes (publish mode).
    pub addr: Option<SocketAddr>,
    /// Where `/metrics` listens when it has an address of its own (`metrics.listen`).
    pub metrics_addr: Option<SocketAddr>,
    /// The shared state (API mode).
    pub state: Option<AppState>,
    /// The publisher's status.
    pub publisher: Arc<PublisherStatus>,
    /// Stops the HTTP server (it stops accepting, then finishes open requests).
    http_stop: watch::Sender<bool>,
    http: Option<JoinHandle<()>>,
    /// Stops the reconciler.
    reconcile_stop: watch::Sender<bool>,
    reconciler: Option<JoinHandle<()>>,
    /// Stops the publisher and the liveness lock, last.
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Graceful shutdown: stop accepting requests, finish the operations in flight (bounded
    /// by `shutdown_grace_s`), stop the reconciler, then stop the publisher and release the
    /// liveness lock, so that no other process undoes an operation this one is finishing and
    /// creates in flight still see their routes go live.
    pub async fn shutdown(self) {
        let _ = self.http_stop.send(true);
        if let Some(st) = &self.state {
            let grace = Duration::from_secs(st.cfg.shutdown_grace_s);
            if !st.ops.drain(grace).await {
                tracing::warn!(
                    in_flight = st.ops.in_flight(),
                    "operations still running after {grace:?}; the reconciler of another process will finish them"
                );
            }
        }
        if let Some(h) = self.http {
            // Open requests waited for their operations above; give their answers a moment.
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        let _ = self.reconcile_stop.send(true);
        if let Some(r) = self.reconciler {
            let _ = r.await;
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Holds this instance's liveness lock on a dedicated connection for the life of the process,
/// re-taking it after the connection drops, and retrying while another session still holds it
/// (a dropped connection's session may linger on the server). `live` says whether it is held.
async fn hold_liveness(db: Db, instance: i32, live: Arc<Liveness>, mut shutdown: watch::Receiver<bool>) {
    let retry = Duration::from_secs(1);
    loop {
        live.set(false);
        let mut conn = match db.dedicated().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "liveness connection failed; not operating until it is back");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        match db::hold_instance_lock(&mut conn, instance).await {
            Ok(true) => {
                live.set(true);
                tracing::debug!(instance, "liveness lock held");
            }
            Ok(false) => {
                tracing::warn!(instance, "liveness lock still held by an old session; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "taking the liveness lock");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    if Db::ping_conn(&mut conn).await.is_err() {
                        tracing::warn!("liveness connection lost; not operating until the lock is back");
                        break;
                    }
                }
                _ = shutdown.changed() => {
                    live.set(false);
                    return;
                }
            }
        }
    }
}

/// Serves `app` on `listener` until `stop` changes (then finishes the open requests).
async fn serve_http(listener: tokio::net::TcpListener, app: axum::Router, mut stop: watch::Receiver<bool>, what: &'static str) {
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "{what} server failed");
    }
}

/// The rest of a start without an API (`gpugate-api publish`): a whole re-sync every
/// `reconcile_interval_s` in place of the reconciler's, and `/healthz`, `/readyz` and
/// `/metrics` on `cfg.listen` (`/metrics` on `metrics.listen` when set), so the gateway host
/// can be probed and scraped like an API process.
async fn publish_only(
    cfg: Arc<Config>,
    metrics: Metrics,
    status: Arc<PublisherStatus>,
    resync: Resync,
    shutdown: watch::Sender<bool>,
    rx: watch::Receiver<bool>,
    mut tasks: Vec<JoinHandle<()>>,
) -> anyhow::Result<Running> {
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
    // Both addresses are bound before either serves, so a bad one fails the start cleanly.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {} (listen / GPUGATE_LISTEN) for the publisher's probes", cfg.listen))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match cfg.metrics.listen {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at).await.with_context(|| format!("binding metrics.listen {at}"))?,
        ),
        None => None,
    };
    let probes = crate::http::publisher::PublishState {
        cfg: cfg.clone(),
        status: status.clone(),
        metrics,
        ready_log: Default::default(),
    };
    let (http_stop, _) = watch::channel(false);
    let http = tokio::spawn(serve_http(
        listener,
        crate::http::publisher::router(probes.clone()),
        http_stop.subscribe(),
        "probe HTTP",
    ));
    let mut metrics_addr = None;
    if let Some(listener) = metrics_listener {
        metrics_addr = Some(listener.local_addr()?);
        let app = crate::http::publisher::metrics_router(probes);
        tasks.push(tokio::spawn(serve_http(listener, app, http_stop.subscribe(), "metrics HTTP")));
    }
    tracing::info!(%addr, gateway = %cfg.gateway_name, "publisher probes listening (/healthz, /readyz, /metrics)");
    let (reconcile_stop, _) = watch::channel(false);
    Ok(Running {
        addr: Some(addr),
        metrics_addr,
        state: None,
        publisher: status,
        http_stop,
        http: Some(http),
        reconcile_stop,
        reconciler: None,
        shutdown,
        tasks,
    })
}

/// Starts everything for `mode`. The HTTP server (the API, or a publisher's probes) is bound
/// to `cfg.listen` (port 0 picks a free port; see [`Running::addr`]).
pub async fn start(cfg: Config, mode: Mode) -> anyhow::Result<Running> {
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    if cfg.database_url.is_empty() {
        anyhow::bail!("no database configured: set DATABASE_URL or database_url");
    }
    let cfg = Arc::new(cfg);
    let begun = std::time::Instant::now();
    let step = |what: &str| tracing::info!(listen = %cfg.listen, ms = begun.elapsed().as_millis() as u64, "start-up: {what}");
    let db = Db::connect(&cfg).await.context("connecting to PostgreSQL")?;
    // A gateway's publisher reads routes and writes its own registry row only, with a role
    // that cannot change the schema: it checks the schema instead of migrating it.
    // A gateway that starts before any API has migrated waits for the schema.
    if mode == Mode::PublishOnly {
        let mut waiting = false;
        while let Err(e) = db.check_schema().await {
            if !waiting {
                tracing::warn!("{e}; waiting for it");
                waiting = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    } else {
        step("connected to PostgreSQL");
        db.migrate().await.context("applying database migrations")?;
        step("migrations applied");
    }
    let metrics = Metrics::new();
    let status = Arc::new(PublisherStatus::default());
    let resync = Resync::default();
    let (tx, rx) = watch::channel(false);
    let mut tasks = vec![];

    // The engine and its GPU mode are checked before anything starts: a mode the engine
    // cannot serve is a refusal to start naming the fix, not a failure at the first create.
    let engine = match mode {
        Mode::PublishOnly => None,
        Mode::Api { .. } => {
            let mut docker = DockerClient::connect(&cfg).await.context("connecting to Docker")?;
            step("connected to Docker");
            let facts = |probe| docker.gpu_facts(&cfg.docker.default_image, probe);
            let (backend, devices) = crate::gpu::prepare(&cfg, facts).await.map_err(anyhow::Error::msg)?;
            step("GPU backend prepared");
            docker.set_gpu(backend);
            Some((docker, devices))
        }
    };

    let run_publisher = matches!(mode, Mode::PublishOnly | Mode::Api { publisher: true });
    if run_publisher {
        let p = Publisher::new(
            db.clone(),
            &cfg.route_table,
            cfg.names.table_slots,
            metrics.clone(),
            status.clone(),
            resync.clone(),
            crate::registry::Identity {
                name: cfg.gateway_name.clone(),
                heartbeat: Duration::from_millis(cfg.gateway_heartbeat_ms),
                activity_report: Duration::from_millis(cfg.gateway_activity_report_ms),
            },
        );
        tasks.push(tokio::spawn(p.run(rx.clone())));
    }

    if mode == Mode::PublishOnly {
        return publish_only(cfg, metrics, status, resync, tx, rx, tasks).await;
    }

    let report = ports::sync_pools(&db, &cfg).await.context("synchronising port pools")?;
    tracing::info!(?report, "port pools synchronised");
    step("port pools synchronised");
    let Some((mut docker, devices)) = engine else {
        anyhow::bail!("API mode without a Docker engine");
    };
    let host = &cfg.fleet.host_name;
    let engine_id = docker.engine_id().map(str::to_string);
    if let Some(recorded) = db::hosts::adopt_local(&db, host, cfg.docker.endpoint.trim(), cfg.upstream_host, engine_id.as_deref())
        .await
        .context("registering this API's own host")?
    {
        anyhow::bail!(
            "fleet.host_name \"{host}\" is Docker engine {recorded} in the database, but this process's engine is {}: \
             another API process acts for that host with another engine. Give this process its own fleet.host_name, \
             or, if the host was rebuilt with a new engine, run `gpugate-api host forget-engine {host}` first",
            engine_id.as_deref().unwrap_or("unknown")
        );
    }
    step("own host registered");
    let change = gpus::sync_inventory(&db, host, &devices).await.context("synchronising the GPU inventory")?;
    tracing::info!(gpus = devices.len(), added = change.added.len(), retired = change.retired.len(), "GPU inventory synchronised");
    step("GPU inventory synchronised");
    docker.ensure_network().await.context("preparing the workspace network")?;
    step("workspace network ready");

    let instance = crate::ids::instance_id();
    let liveness = Arc::new(Liveness::default());
    tasks.push(tokio::spawn(hold_liveness(db.clone(), instance, liveness.clone(), rx.clone())));
    // Operate only once the lock is held (a second or so at most on a healthy database).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !liveness.holding() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    step("liveness lock wait over");

    let readiness = Arc::new(crate::readiness::Prober::new(
        db.clone(),
        metrics.clone(),
        cfg.readiness.clone(),
        i64::from(instance),
        rx.clone(),
    ));
    let fleet = crate::fleet::Fleet::new(cfg.clone(), db.clone(), docker);
    let ops = Operations::new(db.clone(), i64::from(instance), liveness.clone());
    let host_ca = crate::ssh_identity::HostCa::load(&db).await.context("reading the deployment's SSH host CA")?;
    step("SSH host CA read");
    let state: AppState = Arc::new(State {
        cfg: cfg.clone(),
        db,
        fleet,
        metrics,
        readiness,
        table: Arc::new(TableView::new(&cfg.route_table)),
        publisher: status.clone(),
        resync,
        instance: i64::from(instance),
        liveness,
        ops,
        ready_log: Default::default(),
        host_ca,
    });
    // Gauges from the database and the table: filled once before the first scrape can come,
    // then refreshed in the background (a scrape never queries).
    let mut gauges = crate::metrics::gauges::Refresher::new(
        state.db.clone(),
        state.table.clone(),
        cfg.clone(),
        state.metrics.clone(),
    );
    gauges.refresh().await;
    step("gauges filled");
    tasks.push(tokio::spawn(gauges.run(rx.clone())));
    tasks.push(tokio::spawn(crate::idle::run(state.clone(), rx.clone())));
    tasks.push(tokio::spawn(crate::host_health::run(state.clone(), rx.clone())));
    let (reconcile_stop, reconcile_rx) = watch::channel(false);
    let reconciler = tokio::spawn(crate::reconcile::run(
        state.clone(),
        Duration::from_secs(cfg.reconcile_interval_s),
        reconcile_rx,
    ));

    // Both addresses are bound before either serves, so a bad one fails the start cleanly.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match cfg.metrics.listen {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at).await.with_context(|| format!("binding metrics.listen {at}"))?,
        ),
        None => None,
    };
    let (http_stop, _) = watch::channel(false);
    let http = tokio::spawn(serve_http(listener, crate::http::router(state.clone()), http_stop.subscribe(), "HTTP"));
    let mut metrics_addr = None;
    if let Some(listener) = metrics_listener {
        let bound = listener.local_addr()?;
        let app = crate::http::metrics_router(state.clone());
        tasks.push(tokio::spawn(serve_http(listener, app, http_stop.subscribe(), "metrics HTTP")));
        tracing::info!(addr = %bound, "metrics listening (only /metrics and /healthz)");
        metrics_addr = Some(bound);
    }
    tracing::info!(%addr, instance, "gpugate-api listening");
    Ok(Running {
        addr: Some(addr),
        metrics_addr,
        state: Some(state),
        publisher: status,
        http_stop,
        http: Some(http),
        reconcile_stop,
        reconciler: Some(reconciler),
        shutdown: tx,
        tasks,
    })
}
