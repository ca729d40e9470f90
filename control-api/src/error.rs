//! The one API error type, its HTTP statuses, its envelope codes, and the response envelope.
//!
//! Every response is `{"code": N, "message": "...", "data": ...}`: `code` 0 on success, and on
//! failure a stable number per error kind (documented in the README) with the matching status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use gpugate_routes::Service;
use serde::Serialize;

/// Everything an API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400, code 1001: the body is not valid JSON.
    #[error("{0}")]
    BadRequest(String),
    /// 422, code 1002: the JSON is well formed but a field is missing, unknown or invalid.
    #[error("{0}")]
    Validation(String),
    /// 401, code 1003: no bearer token, or one that is not known.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 403, code 1004: the endpoint needs an admin token.
    #[error("this endpoint needs an admin token")]
    Forbidden,
    /// 404, code 1005: no such resource for this caller (another user's environment too).
    #[error("{0}")]
    NotFound(String),
    /// 409, code 1006: the resource is in a state that does not allow the operation.
    #[error("{0}")]
    Conflict(String),
    /// 422, code 1007: the requested image is not present on the Docker host.
    #[error("image \"{0}\" is not present on the Docker host (pull it there first: docker pull {0})")]
    ImageNotFound(String),
    /// 409, code 1008: more GPUs needed (by a create or a start) than are free right now.
    /// The envelope's `data` carries `{"gpus_free": free, "gpus_needed": needed}`, and for a
    /// request of one model also `"gpu_model"` and `"free_by_model"` (`{name: count}`).
    #[error("{message}")]
    GpusUnavailable {
        /// What was refused, naming both counts (and, for a model, what is free).
        message: String,
        /// GPUs (of the model asked for) free when the allocation was tried.
        free: u32,
        /// GPUs the operation needs.
        needed: u32,
        /// The model asked for, and the free GPUs per model name.
        model: Option<(String, Vec<(String, i64)>)>,
    },
    /// 409, code 1011: the operation would take the user past a quota (the message names it).
    #[error("{0}")]
    QuotaExceeded(String),
    /// 429, code 1012: this token sent more requests than its rate allows.
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    /// 413, code 1013: the request body is larger than the API accepts.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 405, code 1014: the path exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 503, code 1009: a service's port pool has no free port.
    #[error("no free {0} port")]
    PoolExhausted(Service),
    /// 503, code 1010: a dependency (database, Docker, route table) is unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// 500, code 1500: anything else; logged where it happened, opaque to the caller.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) | ApiError::ImageNotFound(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::GpusUnavailable { .. } | ApiError::QuotaExceeded(_) => StatusCode::CONFLICT,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PoolExhausted(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Envelope code of the error (stable; documented).
    pub fn code(&self) -> u32 {
        match self {
            ApiError::BadRequest(_) => 1001,
            ApiError::Validation(_) => 1002,
            ApiError::Unauthorized => 1003,
            ApiError::Forbidden => 1004,
            ApiError::NotFound(_) => 1005,
            ApiError::Conflict(_) => 1006,
            ApiError::ImageNotFound(_) => 1007,
            ApiError::GpusUnavailable { .. } => 1008,
            ApiError::PoolExhausted(_) => 1009,
            ApiError::Unavailable(_) => 1010,
            ApiError::QuotaExceeded(_) => 1011,
            ApiError::RateLimited(_) => 1012,
            ApiError::PayloadTooLarge(_) => 1013,
            ApiError::MethodNotAllowed(_) => 1014,
            ApiError::Internal(_) => 1500,
        }
    }

    /// An internal error, logged once here with its cause; the caller sees "internal error".
    pub fn internal(context: &str, err: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "{context}");
        ApiError::Internal(format!("{context}: {err}"))
    }

    /// What the error's envelope carries in `data` (`null` for most errors).
    pub fn data(&self) -> Option<GpusShortfall> {
        match self {
            ApiError::GpusUnavailable { free, needed, model, .. } => Some(GpusShortfall {
                gpus_free: *free,
                gpus_needed: *needed,
                gpu_model: model.as_ref().map(|(m, _)| m.clone()),
                free_by_model: model.as_ref().map(|(_, by)| by.iter().cloned().collect()),
            }),
            _ => None,
        }
    }

    /// The environment `id` does not exist for this caller.
    pub fn env_not_found(id: &str) -> ApiError {
        ApiError::NotFound(format!("environment \"{id}\" not found"))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::error!(error = %e, "database unavailable");
                ApiError::Unavailable("database unavailable".into())
            }
            // Starting up or shutting down (57P01-57P03) and out of connection slots (53300):
            // the database is there but cannot serve now, which is a 503, not a 500.
            sqlx::Error::Database(d)
                if matches!(d.code().as_deref(), Some("57P01" | "57P02" | "57P03" | "53300")) =>
            {
                tracing::error!(error = %e, "database not accepting connections");
                ApiError::Unavailable("database unavailable".into())
            }
            // A deadlock or serialization failure (40P01, 40001) rolled the transaction back:
            // nothing changed, and the same request may well pass now.
            sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40P01" | "40001")) => {
                tracing::warn!(error = %e, "transaction rolled back by contention");
                ApiError::Unavailable("the database was busy with a conflicting change; try again".into())
            }
            _ => ApiError::internal("database error", e),
        }
    }
}

/// `data` of the error with code 1008: how many GPUs were free and how many were needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct GpusShortfall {
    /// GPUs (of the model asked for) free when the allocation was tried.
    pub gpus_free: u32,
    /// GPUs the operation needs.
    pub gpus_needed: u32,
    /// The model the request asked for (only when it named one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// Free GPUs per model name (only when the request named a model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_by_model: Option<std::collections::BTreeMap<String, i64>>,
}

/// The response envelope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Envelope<T: Serialize> {
    /// 0 on success, else the error's code.
    pub code: u32,
    /// "success", or what went wrong.
    pub message: String,
    /// The payload (`null` on errors).
    #[schema(required = true)]
    pub data: Option<T>,
}

/// The envelope of every error: a non-zero `code` (see the error codes table), a message for
/// the user, and `data` `null`, except code 1008 whose `data` says how many GPUs were free
/// and needed. (The OpenAPI document's name for `Envelope<GpusShortfall>` on errors.)
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"code": 1005, "message": "environment \"6hiflzwte2xnkroq\" not found", "data": null}))]
pub struct ErrorEnvelope {
    /// The error's code (1001-1014, 1500), never 0.
    #[schema(minimum = 1001, maximum = 1500)]
    pub code: u32,
    /// What went wrong, for a person to read.
    pub message: String,
    /// `null`, except for code 1008.
    #[schema(required = true)]
    pub data: Option<GpusShortfall>,
}

/// A successful response: status plus payload in the envelope.
pub struct Success<T: Serialize>(pub StatusCode, pub T);

/// 200 with `data`.
pub fn ok<T: Serialize>(data: T) -> Success<T> {
    Success(StatusCode::OK, data)
}

impl<T: Serialize> IntoResponse for Success<T> {
    fn into_response(self) -> Response {
        let body = Envelope { code: 0, message: "success".into(), data: Some(self.1) };
        (self.0, Json(body)).into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Envelope { code: self.code(), message: self.to_string(), data: self.data() };
        let mut resp = (self.status(), Json(body)).into_response();
        if let ApiError::RateLimited(secs) = self {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// Result type of handlers.
pub type ApiResult<T> = Result<Success<T>, ApiError>;
