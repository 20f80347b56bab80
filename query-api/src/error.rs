//! The query API's errors and the one table that maps them to HTTP answers.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use platform::{FieldError, Problem};

use crate::history::HistoryError;
use crate::webhooks::EndpointsError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no valid bearer token")]
    Unauthenticated,
    #[error("not allowed")]
    Forbidden,
    #[error("no such account")]
    NotFound,
    #[error("no such webhook endpoint")]
    NoSuchWebhook,
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    /// A request header this API reads is malformed; the detail says which and why.
    #[error("invalid header: {0}")]
    InvalidHeader(&'static str),
    /// `X-Min-Position` names a position nobody has written (yet): waiting for it would hold
    /// a connection in vain.
    #[error("X-Min-Position {0} is beyond the last position written")]
    UnknownPosition(u64),
    #[error("the read model has not reached position {0} in time")]
    NotYetConsistent(u64),
    /// The message store's readers did not see `X-Min-Position` in time: a transaction that
    /// began before it was written is still open (ADR 2).
    #[error("the message store's readers do not see position {0} yet")]
    StoreNotYetReadable(u64),
    #[error("read model")]
    ReadModel(#[from] sqlx::Error),
    #[error("message store")]
    Store(#[from] message_store::StoreError),
    #[error("message store")]
    History(#[from] HistoryError),
    #[error("message store")]
    Endpoints(#[from] EndpointsError),
}

impl ApiError {
    pub fn invalid(field: &str, message: impl ToString) -> Self {
        Self::Invalid(vec![FieldError::new(field, message)])
    }

    /// The answer for each error. Unexpected ones are logged here, once, with their cause; the
    /// client sees an opaque problem.
    pub fn problem(&self) -> Problem {
        match self {
            // Whatever failed (no token, a bad one, an account no longer active): no hint of
            // which check it was.
            Self::Unauthenticated => Problem::unauthorized("invalid_token")
                .with_detail("a valid bearer token is required"),
            Self::Forbidden => {
                Problem::forbidden().with_detail("this account is not yours to read")
            }
            Self::NotFound => Problem::not_found().with_detail("no such account"),
            Self::NoSuchWebhook => Problem::not_found().with_detail("no such webhook endpoint"),
            Self::Invalid(errors) => Problem::validation(errors.clone()),
            Self::InvalidHeader(detail) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid_header").with_detail(*detail)
            }
            Self::UnknownPosition(_) => Problem::new(StatusCode::BAD_REQUEST, "unknown_position")
                .with_detail("X-Min-Position is beyond the last position written"),
            Self::NotYetConsistent(position) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not_yet_consistent")
                    .with_detail(format!(
                        "the read model has not reached position {position} yet; retry shortly"
                    ))
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            Self::StoreNotYetReadable(position) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not_yet_consistent")
                    .with_detail(format!(
                        "the message store does not show position {position} to readers yet \
                         (an older transaction is still open); retry shortly"
                    ))
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            Self::ReadModel(error) => {
                tracing::error!(%error, "reading the read model failed");
                Problem::unavailable()
            }
            Self::Store(error) => {
                tracing::error!(%error, "reading the message store failed");
                Problem::unavailable()
            }
            Self::History(error) => {
                tracing::error!(%error, "reading an account's history failed");
                match error {
                    HistoryError::Store(_) => Problem::unavailable(),
                    HistoryError::Sealed(vault) if vault.is_unavailable() => Problem::unavailable(),
                    // A key under a master key not configured, a field that does not open:
                    // no retry mends it.
                    HistoryError::Undecodable { .. } | HistoryError::Sealed(_) => {
                        Problem::internal()
                    }
                }
            }
            Self::Endpoints(error) => {
                tracing::error!(%error, "reading the webhook endpoints failed");
                match error {
                    EndpointsError::Store(_) => Problem::unavailable(),
                    // An event this build cannot read: no retry mends it.
                    EndpointsError::Undecodable { .. } => Problem::internal(),
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.problem().into_response()
    }
}

#[cfg(test)]
mod tests {
    use identity::EventDecodeError;
    use message_store::StoreError;

    use super::*;

    #[test]
    fn every_error_maps_to_its_status_and_code() {
        let table = [
            (
                ApiError::Unauthenticated,
                StatusCode::UNAUTHORIZED,
                "invalid_token",
            ),
            (ApiError::Forbidden, StatusCode::FORBIDDEN, "forbidden"),
            (ApiError::NotFound, StatusCode::NOT_FOUND, "not_found"),
            (ApiError::NoSuchWebhook, StatusCode::NOT_FOUND, "not_found"),
            (
                ApiError::Endpoints(EndpointsError::Store(StoreError::Database(
                    sqlx::Error::PoolTimedOut,
                ))),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                ApiError::Endpoints(EndpointsError::Undecodable {
                    position: 7,
                    source: EventDecodeError::UnknownType {
                        event_type: "WebhookRenamed".into(),
                    },
                }),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
            ),
            (
                ApiError::invalid("limit", "too big"),
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
            ),
            (
                ApiError::InvalidHeader("X-Min-Position must be given once"),
                StatusCode::BAD_REQUEST,
                "invalid_header",
            ),
            (
                ApiError::UnknownPosition(7),
                StatusCode::BAD_REQUEST,
                "unknown_position",
            ),
            (
                ApiError::NotYetConsistent(7),
                StatusCode::SERVICE_UNAVAILABLE,
                "not_yet_consistent",
            ),
            (
                ApiError::StoreNotYetReadable(7),
                StatusCode::SERVICE_UNAVAILABLE,
                "not_yet_consistent",
            ),
            (
                ApiError::ReadModel(sqlx::Error::PoolTimedOut),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                ApiError::Store(StoreError::Database(sqlx::Error::PoolTimedOut)),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                ApiError::History(HistoryError::Store(StoreError::Database(
                    sqlx::Error::PoolTimedOut,
                ))),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                ApiError::History(HistoryError::Sealed(personal_data::VaultError::Database(
                    sqlx::Error::PoolTimedOut,
                ))),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                ApiError::History(HistoryError::Sealed(
                    personal_data::VaultError::UnknownMasterKey("1".into()),
                )),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
            ),
            (
                ApiError::History(HistoryError::Undecodable {
                    position: 7,
                    source: EventDecodeError::UnknownType {
                        event_type: "Happened".into(),
                    },
                }),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
            ),
        ];
        for (error, status, code) in table {
            let problem = error.problem();
            assert_eq!(
                (problem.status(), problem.code()),
                (status, code),
                "{error:?}"
            );
            // A client told to come back later is told when; no other answer says so.
            let retry_after = problem
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .cloned();
            if matches!(
                status,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            ) {
                let seconds =
                    retry_after.and_then(|value| value.to_str().ok()?.parse::<u32>().ok());
                assert!(
                    seconds.is_some_and(|seconds| seconds > 0),
                    "{error:?}: a {status} without a Retry-After in seconds"
                );
            } else {
                assert_eq!(retry_after, None, "{error:?}");
            }
        }
    }

    #[test]
    fn an_unauthenticated_answer_challenges_for_a_bearer_token() {
        let response = ApiError::Unauthenticated.into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
