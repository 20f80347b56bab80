//! The one error type of the API, and its table from error to status and code: the only place
//! that knows what a client is told when a command does not succeed.

use std::error::Error;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use platform::Problem;

use crate::service::CommandError;
use crate::webhooks::WebhookError;

/// Everything the API can answer other than success: a command's own error, or what the HTTP
/// layer refuses before a command runs.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// No bearer token, one that does not verify, or one whose session is no longer live (logged
    /// out, ended, expired, or ended with the account: deactivated, password changed, all its
    /// sessions ended).
    #[error("missing or invalid token")]
    InvalidToken,
    #[error("forbidden")]
    Forbidden,
    #[error("an administrator cannot deactivate their own account")]
    SelfDeactivation,
}

impl ApiError {
    /// The table: error → problem. Kept in one place so it can be read and tested whole.
    pub fn to_problem(&self) -> Problem {
        match self {
            Self::Command(error) => match error {
                CommandError::Validation(errors) => Problem::validation(errors.clone()),
                CommandError::EmailTaken => {
                    conflict("email_taken", "an account with this email exists")
                }
                CommandError::IdTaken => conflict(
                    "id_taken",
                    "an account with this id and another email exists",
                ),
                CommandError::InvalidCredentials => Problem::unauthorized("invalid_credentials")
                    .with_detail(
                        "the email or the password is wrong, or the account cannot log in",
                    ),
                CommandError::InvalidRefreshToken => {
                    Problem::unauthorized("invalid_refresh_token").with_detail(
                        "the refresh token is not valid, or its session has ended or expired: log in again",
                    )
                }
                CommandError::InvalidLink => {
                    Problem::new(StatusCode::BAD_REQUEST, "invalid_link").with_detail(
                        "the link is not valid, was used already, was replaced by a newer one or has expired: ask for a new one",
                    )
                }
                CommandError::NotFound => Problem::not_found().with_detail("no such account"),
                CommandError::AccountErased => Problem::new(StatusCode::GONE, "account_erased")
                    .with_detail("the account was erased; nothing of its person is kept"),
                CommandError::SessionNotFound => {
                    Problem::not_found().with_detail("no such session")
                }
                CommandError::AccountInactive => {
                    conflict("account_inactive", "the account is deactivated")
                }
                CommandError::LastAdministrator => conflict(
                    "last_administrator",
                    "no other administrator is active; activate another one first",
                ),
                CommandError::Busy => Problem::new(StatusCode::TOO_MANY_REQUESTS, "throttled")
                    .with_detail("too many password checks at once; try again shortly")
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")),
                CommandError::StoreUnavailable(_) => Problem::unavailable(),
                CommandError::Internal(_) => Problem::internal(),
            },
            Self::Webhook(error) => match error {
                WebhookError::Validation(errors) => Problem::validation(errors.clone()),
                WebhookError::Exists => conflict(
                    "webhook_exists",
                    "an endpoint with this id exists or existed; if this is a retry whose answer \
                     was lost, rotate its secret (POST /webhooks/{id}/rotate-secret) to get one",
                ),
                WebhookError::NotFound => {
                    Problem::not_found().with_detail("no such webhook endpoint")
                }
                WebhookError::StoreUnavailable(_) => Problem::unavailable(),
                WebhookError::Internal(_) => Problem::internal(),
            },
            Self::InvalidToken => Problem::unauthorized("invalid_token")
                .with_detail("send a valid access token as `Authorization: Bearer <token>`"),
            Self::Forbidden => {
                Problem::forbidden().with_detail("the token does not allow this operation")
            }
            Self::SelfDeactivation => conflict(
                "cannot_deactivate_self",
                "another administrator must deactivate this account",
            ),
        }
    }
}

/// A 409: the request is fine, but the state of the accounts refuses it.
fn conflict(code: &'static str, detail: &'static str) -> Problem {
    Problem::new(StatusCode::CONFLICT, code).with_detail(detail)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Command(
            error @ (CommandError::Internal(_) | CommandError::StoreUnavailable(_)),
        ) = &self
        {
            // The one place an unexpected error is logged; the client sees an opaque 500, or a
            // retryable 503 when the store was out of reach.
            // The chain carries store and hashing errors, never a request's values.
            tracing::error!(error = with_causes(error), "command failed");
        }
        if let Self::Webhook(
            error @ (WebhookError::Internal(_) | WebhookError::StoreUnavailable(_)),
        ) = &self
        {
            tracing::error!(error = with_causes(error), "webhook command failed");
        }
        self.to_problem().into_response()
    }
}

/// An error and each of its causes, as `outer: cause: cause`.
fn with_causes(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text = format!("{text}: {error}");
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(error: CommandError) -> ApiError {
        ApiError::Command(error)
    }

    fn webhook(error: WebhookError) -> ApiError {
        ApiError::Webhook(error)
    }

    #[test]
    fn every_error_has_its_status_and_stable_code_and_a_retryable_one_says_when() {
        let table = [
            (
                command(CommandError::Validation(vec![])),
                422,
                "validation_failed",
            ),
            (command(CommandError::EmailTaken), 409, "email_taken"),
            (command(CommandError::IdTaken), 409, "id_taken"),
            (
                command(CommandError::InvalidCredentials),
                401,
                "invalid_credentials",
            ),
            (
                command(CommandError::InvalidRefreshToken),
                401,
                "invalid_refresh_token",
            ),
            (command(CommandError::InvalidLink), 400, "invalid_link"),
            (command(CommandError::NotFound), 404, "not_found"),
            (command(CommandError::AccountErased), 410, "account_erased"),
            (command(CommandError::SessionNotFound), 404, "not_found"),
            (
                command(CommandError::AccountInactive),
                409,
                "account_inactive",
            ),
            (
                command(CommandError::LastAdministrator),
                409,
                "last_administrator",
            ),
            (command(CommandError::Busy), 429, "throttled"),
            (
                command(CommandError::StoreUnavailable(anyhow::anyhow!("no route"))),
                503,
                "unavailable",
            ),
            (
                command(CommandError::Internal(anyhow::anyhow!("disk on fire"))),
                500,
                "internal_error",
            ),
            (
                webhook(WebhookError::Validation(vec![])),
                422,
                "validation_failed",
            ),
            (webhook(WebhookError::Exists), 409, "webhook_exists"),
            (webhook(WebhookError::NotFound), 404, "not_found"),
            (
                webhook(WebhookError::StoreUnavailable(anyhow::anyhow!("no route"))),
                503,
                "unavailable",
            ),
            (
                webhook(WebhookError::Internal(anyhow::anyhow!("disk on fire"))),
                500,
                "internal_error",
            ),
            (ApiError::InvalidToken, 401, "invalid_token"),
            (ApiError::Forbidden, 403, "forbidden"),
            (ApiError::SelfDeactivation, 409, "cannot_deactivate_self"),
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
        for error in [
            command(CommandError::InvalidCredentials),
            command(CommandError::InvalidRefreshToken),
            ApiError::InvalidToken,
        ] {
            let response = error.into_response();
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        }
    }

    #[tokio::test]
    async fn an_internal_error_tells_the_client_nothing_of_its_cause() {
        for error in [
            command(CommandError::Internal(anyhow::anyhow!("disk on fire"))),
            webhook(WebhookError::Internal(anyhow::anyhow!("disk on fire"))),
        ] {
            let body = axum::body::to_bytes(error.into_response().into_body(), 4096)
                .await
                .unwrap();
            assert!(!String::from_utf8_lossy(&body).contains("disk"));
        }
    }

    #[test]
    fn a_logged_error_names_each_of_its_causes() {
        let error = CommandError::StoreUnavailable(
            anyhow::anyhow!("connection refused").context("appending a login event"),
        );
        assert_eq!(
            with_causes(&error),
            "the message store is out of reach: appending a login event: connection refused"
        );
    }
}
