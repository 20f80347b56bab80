//! The one error type of the API, and its table from variant to status and code.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use platform::{FieldError, Problem};

use crate::hashing::HashError;

/// Everything a command can answer other than success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("some fields are not acceptable")]
    Validation(Vec<FieldError>),
    #[error("the email is taken")]
    EmailTaken,
    #[error("the id is taken by another account")]
    IdTaken,
    /// Any failed login or password proof: one answer, so nobody learns why.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// No bearer token, or one that does not verify.
    #[error("missing or invalid token")]
    InvalidToken,
    #[error("forbidden")]
    Forbidden,
    #[error("no such account")]
    NotFound,
    #[error("the account is deactivated")]
    AccountInactive,
    #[error("an administrator cannot deactivate their own account")]
    SelfDeactivation,
    /// The account is the last active administrator: without it nobody could activate anyone.
    #[error("the account is the last active administrator")]
    LastAdministrator,
    /// Too many password checks are waiting for a core.
    #[error("throttled")]
    Throttled,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<HashError> for ApiError {
    fn from(error: HashError) -> Self {
        match error {
            HashError::Busy => Self::Throttled,
            HashError::Failed(reason) => Self::Internal(anyhow::anyhow!(reason)),
        }
    }
}

impl From<identity::Refusal> for ApiError {
    fn from(refusal: identity::Refusal) -> Self {
        match refusal {
            identity::Refusal::NotFound => Self::NotFound,
            identity::Refusal::AccountInactive => Self::AccountInactive,
            identity::Refusal::LastAdministrator => Self::LastAdministrator,
            // Only a registration can meet it, and a registration decides on no account.
            identity::Refusal::AlreadyRegistered => Self::Internal(anyhow::anyhow!(
                "a command on an account decided a registration"
            )),
        }
    }
}

impl From<message_store::StoreError> for ApiError {
    fn from(error: message_store::StoreError) -> Self {
        Self::Internal(anyhow::Error::new(error).context("using the message store"))
    }
}

impl ApiError {
    /// The table: variant → problem. Kept in one place so it can be read and tested whole.
    pub fn to_problem(&self) -> Problem {
        match self {
            Self::Validation(errors) => Problem::validation(errors.clone()),
            Self::EmailTaken => Problem::new(StatusCode::CONFLICT, "email_taken")
                .with_detail("an account with this email exists"),
            Self::IdTaken => Problem::new(StatusCode::CONFLICT, "id_taken")
                .with_detail("an account with this id and another email exists"),
            Self::InvalidCredentials => Problem::unauthorized("invalid_credentials")
                .with_detail("the email or the password is wrong, or the account cannot log in"),
            Self::InvalidToken => Problem::unauthorized("invalid_token")
                .with_detail("send a valid access token as `Authorization: Bearer <token>`"),
            Self::Forbidden => {
                Problem::forbidden().with_detail("the token does not allow this operation")
            }
            Self::NotFound => Problem::not_found().with_detail("no such account"),
            Self::AccountInactive => Problem::new(StatusCode::CONFLICT, "account_inactive")
                .with_detail("the account is deactivated"),
            Self::SelfDeactivation => Problem::new(StatusCode::CONFLICT, "cannot_deactivate_self")
                .with_detail("another administrator must deactivate this account"),
            Self::LastAdministrator => Problem::new(StatusCode::CONFLICT, "last_administrator")
                .with_detail("no other administrator is active; activate another one first"),
            Self::Throttled => Problem::new(StatusCode::TOO_MANY_REQUESTS, "throttled")
                .with_detail("too many password checks at once; try again shortly")
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")),
            Self::Internal(error) if store_unavailable(error) => Problem::unavailable(),
            Self::Internal(_) => Problem::internal(),
        }
    }
}

/// Whether an unexpected error comes from the message store being out of reach, which a client
/// may retry, rather than from a fault of the service.
fn store_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<message_store::StoreError>()
            .is_some_and(message_store::StoreError::is_unavailable)
            || cause
                .downcast_ref::<message_store::AppendError>()
                .is_some_and(|error| {
                    matches!(error, message_store::AppendError::Store(store) if store.is_unavailable())
                })
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(error) = &self {
            // The one place an unexpected error is logged; the client sees an opaque 500, or a
            // retryable 503 when the store was out of reach.
            // The chain carries store and hashing errors, never a request's values.
            tracing::error!(error = format!("{error:#}"), "command failed");
        }
        self.to_problem().into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_status_and_stable_code_and_a_retryable_one_says_when() {
        let table = [
            (ApiError::Validation(vec![]), 422, "validation_failed"),
            (ApiError::EmailTaken, 409, "email_taken"),
            (ApiError::IdTaken, 409, "id_taken"),
            (ApiError::InvalidCredentials, 401, "invalid_credentials"),
            (ApiError::InvalidToken, 401, "invalid_token"),
            (ApiError::Forbidden, 403, "forbidden"),
            (ApiError::NotFound, 404, "not_found"),
            (ApiError::AccountInactive, 409, "account_inactive"),
            (ApiError::SelfDeactivation, 409, "cannot_deactivate_self"),
            (ApiError::LastAdministrator, 409, "last_administrator"),
            (ApiError::Throttled, 429, "throttled"),
            (
                ApiError::Internal(anyhow::anyhow!("disk on fire")),
                500,
                "internal_error",
            ),
            (
                ApiError::from(message_store::StoreError::Database(
                    sqlx::Error::PoolTimedOut,
                )),
                503,
                "unavailable",
            ),
            (
                ApiError::Internal(
                    anyhow::Error::new(message_store::AppendError::Store(
                        message_store::StoreError::Database(sqlx::Error::PoolClosed),
                    ))
                    .context("appending"),
                ),
                503,
                "unavailable",
            ),
        ];
        for (error, status, code) in table {
            let problem = error.to_problem();
            assert_eq!((problem.status().as_u16(), problem.code()), (status, code));
            // A client told to come back (throttled, or the store out of reach) is told when.
            let response = error.into_response();
            let retry_after = response.headers().get(header::RETRY_AFTER);
            if status == 429 || status == 503 {
                assert_eq!(
                    retry_after.map(HeaderValue::as_bytes),
                    Some(&b"1"[..]),
                    "{code}: no Retry-After"
                );
            } else {
                assert_eq!(retry_after, None, "{code}: a Retry-After on a {status}");
            }
        }
    }

    #[test]
    fn a_401_challenges_for_a_bearer_token() {
        let response = ApiError::InvalidCredentials.into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let response = ApiError::InvalidToken.into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }

    #[tokio::test]
    async fn an_internal_error_tells_the_client_nothing_of_its_cause() {
        let response = ApiError::Internal(anyhow::anyhow!("disk on fire")).into_response();
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("disk"));
    }
}
