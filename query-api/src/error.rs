//! The query API's errors and the one table that maps them to HTTP answers.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use platform::{FieldError, Problem};

use crate::history::HistoryError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no valid bearer token")]
    Unauthenticated,
    #[error("not allowed")]
    Forbidden,
    #[error("no such account")]
    NotFound,
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    #[error("the read model has not reached position {0} in time")]
    NotYetConsistent(u64),
    #[error("read model")]
    ReadModel(#[from] sqlx::Error),
    #[error("message store")]
    Store(#[from] message_store::StoreError),
    #[error("message store")]
    History(#[from] HistoryError),
}

impl ApiError {
    pub fn invalid(field: &str, message: impl ToString) -> Self {
        Self::Invalid(vec![FieldError::new(field, message)])
    }

    /// The answer for each error. Unexpected ones are logged here, once, with their cause; the
    /// client sees an opaque problem.
    pub fn problem(&self) -> Problem {
        match self {
            Self::Unauthenticated => crate::auth::unauthenticated(),
            Self::Forbidden => {
                Problem::forbidden().with_detail("this account is not yours to read")
            }
            Self::NotFound => Problem::not_found().with_detail("no such account"),
            Self::Invalid(errors) => Problem::validation(errors.clone()),
            Self::NotYetConsistent(position) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not_yet_consistent")
                    .with_detail(format!(
                        "the read model has not reached position {position} yet; retry shortly"
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
                    HistoryError::Undecodable { .. } => Problem::internal(),
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
            (
                ApiError::invalid("limit", "too big"),
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
            ),
            (
                ApiError::NotYetConsistent(7),
                StatusCode::SERVICE_UNAVAILABLE,
                "not_yet_consistent",
            ),
            (
                ApiError::ReadModel(sqlx::Error::PoolTimedOut),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
        ];
        for (error, status, code) in table {
            let problem = error.problem();
            assert_eq!(
                (problem.status(), problem.code()),
                (status, code),
                "{error:?}"
            );
        }
    }

    #[test]
    fn an_unauthenticated_answer_challenges_for_a_bearer_token() {
        let response = ApiError::Unauthenticated.into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
