//! What every handler takes from a request: the authenticated caller (or admin), the `{id}`
//! path segment, and JSON bodies and query strings whose errors answer in the envelope.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::db::users::{self, User};
use crate::error::ApiError;
use crate::state::AppState;

/// The user a request's token belongs to, found by the rate limiter in front of the API and
/// carried on the request, so [`Caller`] does not look the token up a second time.
#[derive(Clone)]
pub struct Authenticated(pub User);

/// The authenticated caller (`Authorization: Bearer <token>`): a token that is neither revoked
/// nor expired, looked up on every request (no cache outlives a revocation).
pub struct Caller(pub User);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        // Found by the limiter in front of the API (one lookup per request).
        if let Some(Authenticated(user)) = parts.extensions.get() {
            return Ok(Caller(user.clone()));
        }
        let token = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let user = users::user_for_token(&st.db, token).await?.ok_or(ApiError::Unauthorized)?;
        Ok(Caller(user))
    }
}

/// The bearer token of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC
/// 7235 section 2.1), if there is a plausible one.
pub(super) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim()
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty() && t.len() <= 256)
}

/// Proof that the caller is an authenticated admin (admin handlers need no more of them).
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let Caller(user) = Caller::from_request_parts(parts, st).await?;
        if !user.is_admin {
            return Err(ApiError::Forbidden);
        }
        Ok(Admin)
    }
}

/// The `{id}` path segment; one that cannot be decoded is an unknown environment (404).
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<String>::from_request_parts(parts, st).await {
            Ok(axum::extract::Path(id)) => Ok(IdPath(id)),
            Err(_) => Err(ApiError::NotFound("environment not found".into())),
        }
    }
}

/// The largest request body accepted (axum's default limit): 32 SSH keys of 16 KiB fit.
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// A JSON body; over [`BODY_LIMIT`] is a 413; malformed JSON is a 400, a body that does not fit the type is a 422, both in
/// the envelope.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, st: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, st).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::Validation(e.body_text())),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::BadRequest(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(ApiError::BadRequest("expected Content-Type: application/json".into()))
            }
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge(format!("request body over the limit of {BODY_LIMIT} bytes")))
            }
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// An optional JSON body: none at all (no `Content-Length`, or 0, and no chunked body) and
/// JSON `null` are `None`; one that is there is read like [`Body`].
pub struct OptionalBody<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, st: &S) -> Result<Self, ApiError> {
        let h = req.headers();
        let length = h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).map(str::trim);
        let empty = match length {
            Some(l) => l == "0",
            None => !h.contains_key(header::TRANSFER_ENCODING),
        };
        if empty {
            return Ok(OptionalBody(None));
        }
        let Body(v) = Body::<Option<T>>::from_request(req, st).await?;
        Ok(OptionalBody(v))
    }
}

/// A query string of type `T`; one that does not fit is a 422 naming the parameter.
pub struct QueryOf<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryOf<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::try_from_uri(&parts.uri) {
            Ok(axum::extract::Query(v)) => Ok(QueryOf(v)),
            Err(e) => Err(ApiError::Validation(e.body_text())),
        }
    }
}
