//! The API's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations
//! and the types' `ToSchema` derives (never written by hand), served at
//! `GET /api/v1/openapi.json` and printed by `gpugate-api openapi`.
//!
//! Each annotation lists the statuses its handler answers itself; [`Common`] adds what every
//! authenticated endpoint can answer (401, 429, 500, 503), the bearer scheme, and the links
//! from an environment's answers to the operations on it (which Schemathesis follows to test
//! create → get → access → stop → start → delete as sequences).

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{debug, environments, gateways, gpus, health, hold, hosts, ports, ssh_keys};
use crate::error::ErrorEnvelope;

/// Where the document is served.
pub const PATH: &str = "/api/v1/openapi.json";

/// The document's description: what the API is, the envelope, and the error codes table
/// (kept equal to `ApiError::code` by a unit test below).
const DESCRIPTION: &str = "\
The control API of gpugate: GPU workspaces in Docker, each reachable through the gateway on its own ports.

Every answer is the envelope `{\"code\": 0, \"message\": \"success\", \"data\": ...}`. Errors carry a non-zero `code`, a \
message for the user and `\"data\": null` (except code 1008), with the matching HTTP status. A refused request changes nothing.

Authenticate with `Authorization: Bearer <token>` (`gpugate-api token create --user NAME` prints one). \
A user sees and touches only their own environments: another user's id is a 404.

| code | HTTP | when |
|---|---|---|
| 0 | 200/201 | success |
| 1001 | 400 | malformed JSON, wrong content type |
| 1002 | 422 | unknown or missing field, invalid value, an image not on the allow-list, a limit over its maximum, a bad or reused `Idempotency-Key` |
| 1003 | 401 | missing or unknown bearer token |
| 1004 | 403 | admin endpoint with a user token |
| 1005 | 404 | unknown environment (including another user's), unknown endpoint |
| 1006 | 409 | operation not allowed in the current state (stop a stopped environment, busy) |
| 1007 | 422 | image not present on the Docker host |
| 1008 | 409 | more GPUs requested (create) or needed (start) than are free; `data`: `{\"gpus_free\", \"gpus_needed\"}`, and for a create naming `gpu_model` also `\"gpu_model\"` and `\"free_by_model\"` |
| 1009 | 503 | a pool has no free port |
| 1010 | 503 | database or Docker unavailable, or the process is not operating yet |
| 1011 | 409 | over a quota (the message names it) |
| 1012 | 429 | over the token's request rate; `Retry-After` says when to retry |
| 1013 | 413 | request body over 2 MiB |
| 1014 | 405 | a known path with a method it does not accept |
| 1500 | 500 | internal error (logged with its cause; opaque to the caller) |
";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gpugate control API",
        description = DESCRIPTION,
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        environments::create_environment,
        environments::list_environments,
        environments::get_environment,
        environments::patch_environment,
        environments::delete_environment,
        environments::get_access,
        environments::stop_environment,
        environments::start_environment,
        environments::close_sessions,
        hold::hold_environment,
        ssh_keys::list_ssh_keys,
        ssh_keys::add_ssh_key,
        ssh_keys::remove_ssh_key,
        ports::get_port_stats,
        gpus::list_gpus,
        hosts::list_hosts,
        hosts::add_host,
        hosts::drain_host,
        hosts::undrain_host,
        hosts::remove_host,
        gateways::list_gateways,
        gateways::remove_gateway,
        debug::get_debug_routes,
        debug::reload_pools,
        debug::run_reconcile,
        health::get_healthz,
        health::get_readyz,
        health::get_metrics,
        get_openapi,
    ),
    components(schemas(ErrorEnvelope)),
    modifiers(&Common),
    tags(
        (name = "environments", description = "GPU workspaces: create, inspect, reach, stop, start, delete."),
        (name = "users", description = "The caller's own account: SSH keys every workspace of theirs accepts."),
        (name = "ports", description = "Port pools."),
        (name = "admin", description = "Operators only (an admin token)."),
        (name = "probes", description = "Health, readiness and metrics, without a user token."),
        (name = "meta", description = "This document."),
    ),
)]
struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON, built once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut doc = serde_json::to_value(document()).unwrap_or_default();
        camel_case_links(&mut doc);
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    })
}

/// utoipa 5 writes a Link object's fields in snake case (`operation_id`), which OpenAPI tools
/// ignore, so they would see links without a target; 6.0 fixes it but needs a newer Rust than
/// ours. Renames them in every response's `links`.
fn camel_case_links(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else { return };
    let responses = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses").and_then(|r| r.as_object_mut()))
        .flat_map(|r| r.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else { continue };
        for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
            for (from, to) in [("operation_id", "operationId"), ("operation_ref", "operationRef"), ("request_body", "requestBody")] {
                if let Some(v) = link.remove(from) {
                    link.insert(to.to_string(), v);
                }
            }
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json", body = Object)),
)]
/// `GET /api/v1/openapi.json`: the document, without authentication.
pub async fn get_openapi() -> axum::response::Response {
    ([(header::CONTENT_TYPE, "application/json")], json()).into_response()
}

/// The name of the bearer scheme in `components.securitySchemes`.
const BEARER: &str = "bearer";

/// Operations that take an environment's `{id}`, by the name their link carries.
const ENV_OPERATIONS: &[(&str, &str)] = &[
    ("GetEnvironment", "get_environment"),
    ("PatchEnvironment", "patch_environment"),
    ("GetAccess", "get_access"),
    ("StopEnvironment", "stop_environment"),
    ("StartEnvironment", "start_environment"),
    ("CloseSessions", "close_sessions"),
    ("HoldEnvironment", "hold_environment"),
    ("DeleteEnvironment", "delete_environment"),
];

/// Operations whose success answer is one environment (`data.id`), and that status.
const ANSWER_ENV: &[(&str, &str)] = &[
    ("create_environment", "201"),
    ("get_environment", "200"),
    ("patch_environment", "200"),
    ("stop_environment", "200"),
    ("start_environment", "200"),
    ("hold_environment", "200"),
];

/// What the derive cannot say per handler: the security schemes, the errors every
/// authenticated endpoint shares, and the links between environment operations.
struct Common;

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorEnvelope"))).build();
    ResponseBuilder::new().description(description).content("application/json", content).build().into()
}

impl Modify for Common {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("ggt_…")
                    .description(Some("A token from `gpugate-api token create --user NAME` (admin endpoints: `--admin`)."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "metrics_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`metrics.token`, when the deployment sets one."))
                    .build(),
            ),
        );
        let retry_after = HeaderBuilder::new()
            .schema(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::Integer).minimum(Some(1)))
            .description(Some("Seconds to wait before retrying"))
            .build();
        let common = [
            ("Unauthorized", "401", error_response("Missing, unknown, revoked or expired bearer token (code 1003).")),
            ("TooManyRequests", "429", {
                let RefOr::T(mut r) = error_response("Over the token's request rate (code 1012); `Retry-After` says when to retry.") else {
                    unreachable!("error_response builds a response")
                };
                r.headers.insert("Retry-After".into(), retry_after);
                RefOr::T(r)
            }),
            ("InternalError", "500", error_response("Internal error (code 1500); logged with its cause, opaque here.")),
            (
                "Unavailable",
                "503",
                error_response(
                    "The database or Docker is unavailable, or this process is not operating yet (code 1010); a pool has no free port (code 1009).",
                ),
            ),
        ];
        for (name, _, response) in &common {
            components.responses.insert((*name).to_string(), response.clone());
        }
        let authenticated = SecurityRequirement::new(BEARER, Vec::<String>::new());
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/api/v1/") || path == PATH {
                continue;
            }
            for op in operations(item) {
                op.security = Some(vec![authenticated.clone()]);
                for (name, status, _) in &common {
                    op.responses.responses.insert((*status).to_string(), Ref::from_response_name(*name).into());
                }
                let answers_env = ANSWER_ENV.iter().find(|(id, _)| op.operation_id.as_deref() == Some(id));
                if let Some((_, status)) = answers_env {
                    if let Some(RefOr::T(resp)) = op.responses.responses.get_mut(*status) {
                        for (name, target) in ENV_OPERATIONS {
                            let link = LinkBuilder::new()
                                .operation_id(*target)
                                .parameter("id", "$response.body#/data/id")
                                .description(format!("`{target}` on the environment this answer shows"))
                                .build();
                            resp.links.insert((*name).to_string(), link.into());
                        }
                    }
                }
            }
        }
    }
}

/// Every operation of a path item.
fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;

    #[test]
    fn the_error_codes_table_matches_the_errors() {
        let errors = [
            ApiError::BadRequest(String::new()),
            ApiError::Validation(String::new()),
            ApiError::Unauthorized,
            ApiError::Forbidden,
            ApiError::NotFound(String::new()),
            ApiError::Conflict(String::new()),
            ApiError::ImageNotFound(String::new()),
            ApiError::GpusUnavailable { message: String::new(), free: 0, needed: 1, model: None },
            ApiError::PoolExhausted(gpugate_routes::Service::Ssh),
            ApiError::Unavailable(String::new()),
            ApiError::QuotaExceeded(String::new()),
            ApiError::RateLimited(1),
            ApiError::PayloadTooLarge(String::new()),
            ApiError::MethodNotAllowed(String::new()),
            ApiError::Internal(String::new()),
        ];
        for e in errors {
            let row = format!("| {} | {} |", e.code(), e.status().as_u16());
            assert!(DESCRIPTION.contains(&row), "the description's table lacks {row}");
        }
    }

    #[test]
    fn documented_bounds_are_the_ones_the_api_enforces() {
        use crate::config::{MAX_IDLE_STOP_AFTER_S, MIN_CPUS, MIN_MEMORY_MB, MIN_PIDS};
        let doc: serde_json::Value = serde_json::from_str(json()).expect("the document is JSON");
        let create = &doc["components"]["schemas"]["CreateEnvironment"]["properties"];
        let patch = &doc["components"]["schemas"]["PatchEnvironment"]["properties"];
        let hold = &doc["components"]["schemas"]["HoldEnvironment"]["properties"];
        assert_eq!(hold["seconds"]["maximum"].as_u64(), Some(MAX_IDLE_STOP_AFTER_S));
        assert_eq!(create["idle_stop_after_s"]["maximum"].as_u64(), Some(MAX_IDLE_STOP_AFTER_S));
        assert_eq!(patch["idle_stop_after_s"]["maximum"].as_u64(), Some(MAX_IDLE_STOP_AFTER_S));
        assert_eq!(create["memory_mb"]["minimum"].as_u64(), Some(MIN_MEMORY_MB));
        assert_eq!(create["cpus"]["minimum"].as_f64(), Some(MIN_CPUS));
        assert_eq!(create["pids"]["minimum"].as_u64(), Some(u64::from(MIN_PIDS)));
    }

    #[test]
    fn every_authenticated_operation_has_the_bearer_scheme_and_the_common_errors() {
        let doc: serde_json::Value = serde_json::from_str(json()).expect("the document is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        assert!(paths.len() >= 14, "{paths:?}");
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item") {
                let statuses = op["responses"].as_object().expect("responses");
                assert!(statuses.keys().any(|s| s.starts_with('2')), "{method} {path} documents no success");
                if path.starts_with("/api/v1/") && path != PATH {
                    assert_eq!(op["security"], serde_json::json!([{ "bearer": [] }]), "{method} {path}");
                    for s in ["401", "429", "500", "503"] {
                        assert!(statuses.contains_key(s), "{method} {path} lacks {s}");
                    }
                }
            }
        }
        let links = doc["paths"]["/api/v1/environments"]["post"]["responses"]["201"]["links"].as_object().expect("links");
        assert_eq!(links["DeleteEnvironment"]["operationId"], "delete_environment");
        assert_eq!(links["DeleteEnvironment"]["parameters"]["id"], "$response.body#/data/id");
    }
}
