//! Admin endpoints: the route table side by side with the database, pool reloads, and an
//! on-demand reconcile pass.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use gpugate_routes::{Counters, HeaderInfo, HostKey, Route};
use serde::Serialize;

use super::extract::Admin;
use crate::config::Config;
use crate::db::ports::{self, PoolSyncError, PoolSyncReport};
use crate::db::routes::{self, NameRouteRow, RouteRow};
use crate::error::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::reconcile::{self, Repairs};
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/debug/routes", get(get_debug_routes))
        .route("/api/v1/admin/pools/reload", post(reload_pools))
        .route("/api/v1/admin/reconcile", post(run_reconcile))
}

/// One slot as nginx sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Slot {
    pub port: u16,
    pub upstream: String,
    pub env_id: String,
    pub service: String,
    pub generation: u64,
    pub expires_ms: Option<u64>,
    /// The port's counters, as fields of the slot.
    #[serde(flatten)]
    pub counters: Counters,
}

/// One difference between the database and the table.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Mismatch {
    pub port: u16,
    /// `missing_in_table`, `differs` or `not_in_database`.
    #[schema(value_type = String)]
    pub kind: &'static str,
}

/// `data` of `GET /api/v1/debug/routes`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DebugRoutes {
    pub table_path: String,
    /// `null` when the table cannot be opened; then `table_error` says why.
    #[schema(required = true)]
    pub header: Option<HeaderInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_error: Option<String>,
    pub publisher_active_here: bool,
    pub table: Vec<Slot>,
    pub database: Vec<RouteRow>,
    pub mismatches: Vec<Mismatch>,
    /// Routes by name: the table's hostname slots, the database's `name_routes`, and where
    /// they differ (`<env-id>.<service>`).
    pub name_routes: NameRoutes,
}

/// The name-route half of the debug view.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NameRoutes {
    /// Hostname slots of the table (0: no hostname region) and the probe bound readers use.
    pub slots: u32,
    pub probe_max: u32,
    pub table: Vec<NameSlot>,
    pub database: Vec<NameRouteRow>,
    /// `missing_in_table`, `differs` or `not_in_database`, by `<env-id>.<service>`.
    pub mismatches: Vec<NameMismatch>,
}

/// One name route in the table.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NameSlot {
    pub env_id: String,
    pub service: String,
    pub upstream: String,
    pub generation: u64,
    pub counters: Counters,
}

/// A name route where the table and the database disagree.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NameMismatch {
    pub name: String,
    pub kind: &'static str,
}

#[utoipa::path(
    get,
    path = "/api/v1/debug/routes",
    tag = "admin",
    responses(
        (status = 200, description = "The table's header and slots beside the database's routes, and where they differ.", body = Envelope<DebugRoutes>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
    ),
)]
/// `GET /api/v1/debug/routes` (admin).
async fn get_debug_routes(State(st): State<AppState>, _admin: Admin) -> ApiResult<DebugRoutes> {
    let rows = routes::all(&st.db).await?;
    let wanted: BTreeMap<u16, Route> = routes::desired(&st.db, None).await?;
    let (header, table_error, slots, have) = match st.table.get() {
        Ok(t) => {
            let header = t.header_info();
            let mut slots = vec![];
            let mut have = BTreeMap::new();
            for (port, r) in t.routes() {
                have.insert(port, r);
                slots.push(Slot {
                    port,
                    upstream: r.upstream.to_string(),
                    env_id: r.env_id.to_string(),
                    service: r.service.to_string(),
                    generation: r.generation,
                    expires_ms: r.expires_ms,
                    counters: t.counters(port),
                });
            }
            (Some(header), None, slots, have)
        }
        Err(e) => (None, Some(e.to_string()), vec![], BTreeMap::new()),
    };
    let mismatches = mismatches(&wanted, &have)
        .into_iter()
        .map(|(port, kind)| Mismatch { port, kind })
        .collect();
    let name_rows = routes::all_names(&st.db).await?;
    let name_wanted: BTreeMap<HostKey, Route> = routes::desired(&st.db, None).await?;
    let name_routes = name_view(&st, name_rows, name_wanted);
    Ok(ok(DebugRoutes {
        table_path: st.table.path().display().to_string(),
        header,
        table_error,
        publisher_active_here: st.publisher.active.load(std::sync::atomic::Ordering::Relaxed),
        table: slots,
        database: rows,
        mismatches,
        name_routes,
    }))
}

fn name_view(st: &AppState, rows: Vec<NameRouteRow>, wanted: BTreeMap<HostKey, Route>) -> NameRoutes {
    let mut have = BTreeMap::new();
    let (mut slots, mut probe_max, mut table) = (0, 0, vec![]);
    if let Ok(t) = st.table.get() {
        slots = t.host_slots();
        probe_max = t.host_probe_max();
        for (slot, r) in t.host_routes() {
            have.insert(HostKey::of(&r), r);
            table.push(NameSlot {
                env_id: r.env_id.to_string(),
                service: r.service.to_string(),
                upstream: r.upstream.to_string(),
                generation: r.generation,
                counters: t.counters(slot),
            });
        }
    }
    let mismatches = mismatches(&wanted, &have)
        .into_iter()
        .map(|(k, kind)| NameMismatch { name: format!("{}.{}", k.env_id, k.service), kind })
        .collect();
    NameRoutes { slots, probe_max, table, database: rows, mismatches }
}

/// Re-reads the configuration file (and environment) and re-syncs the pools. Pools may only
/// grow within the ranges bound at start (what nginx listens on).
pub async fn reload_pools_from_config(st: &AppState) -> Result<PoolSyncReport, ApiError> {
    let fresh = Config::load(st.cfg.source.as_deref()).map_err(|e| ApiError::Validation(e.to_string()))?;
    for (name, pool) in &fresh.pools {
        let Some(bound) = st.cfg.pools.get(name).map(|p| p.bound()) else {
            return Err(ApiError::Validation(format!(
                "pool {name} is new; a new pool needs a restart (nginx must bind it)"
            )));
        };
        if !bound.covers(&pool.range) {
            return Err(ApiError::Validation(format!(
                "pool {name}: range {} leaves the bound range {bound}",
                pool.range
            )));
        }
    }
    match ports::sync_pools(&st.db, &fresh).await {
        Ok(r) => Ok(r),
        Err(e @ PoolSyncError::InUse { .. }) => Err(ApiError::Conflict(e.to_string())),
        Err(PoolSyncError::Db(e)) => Err(e.into()),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/admin/pools/reload",
    tag = "admin",
    responses(
        (status = 200, description = "The pools re-read from the configuration and synchronised; what changed.", body = Envelope<PoolSyncReport>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
        (status = 409, description = "A port leaving the pools is allocated (code 1006); nothing changed.", body = ErrorEnvelope),
        (status = 422, description = "The configuration is invalid or leaves the bound ranges (code 1002); nothing changed.", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/admin/pools/reload` (admin).
async fn reload_pools(State(st): State<AppState>, _admin: Admin) -> ApiResult<PoolSyncReport> {
    Ok(ok(reload_pools_from_config(&st).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/admin/reconcile",
    tag = "admin",
    responses(
        (status = 200, description = "One reconcile pass ran; what it repaired.", body = Envelope<Repairs>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/admin/reconcile` (admin): one reconcile pass now.
async fn run_reconcile(State(st): State<AppState>, _admin: Admin) -> ApiResult<Repairs> {
    if !st.liveness.holding() {
        return Err(ApiError::Unavailable(
            "this instance does not hold its database liveness lock right now; try again shortly or ask another instance".into(),
        ));
    }
    let r = reconcile::pass(&st).await.map_err(|e| ApiError::internal("reconcile", format!("{e:#}")))?;
    Ok(ok(r))
}

/// Route maps (by port or by name) compared: `desired` minus what the table holds, and the reverse.
fn mismatches<K: Ord + Copy>(
    wanted: &BTreeMap<K, Route>,
    table: &BTreeMap<K, Route>,
) -> Vec<(K, &'static str)> {
    let mut out = vec![];
    for (key, want) in wanted {
        match table.get(key) {
            None => out.push((*key, "missing_in_table")),
            Some(have) if have != want => out.push((*key, "differs")),
            Some(_) => {}
        }
    }
    for key in table.keys() {
        if !wanted.contains_key(key) {
            out.push((*key, "not_in_database"));
        }
    }
    out.sort_unstable();
    out
}
