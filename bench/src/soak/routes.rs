//! The routes the soak sends requests to, each with the status every request to it should get.

use reqwest::StatusCode;

/// The rows of the report: a route template and the status every request to it should get.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Route {
    Register,
    Login,
    LoginRefused,
    Me,
    Profile,
    Events,
    List,
    Metrics,
}

impl Route {
    pub(super) const ALL: [Route; 8] = [
        Route::Register,
        Route::Login,
        Route::LoginRefused,
        Route::Me,
        Route::Profile,
        Route::Events,
        Route::List,
        Route::Metrics,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Route::Register => "POST /users",
            Route::Login | Route::LoginRefused => "POST /login",
            Route::Me => "GET /users/me",
            Route::Profile => "GET /users/{id}",
            Route::Events => "GET /users/{id}/events",
            Route::List => "GET /users",
            Route::Metrics => "GET /metrics",
        }
    }

    pub(super) fn expected(self) -> StatusCode {
        match self {
            Route::Register => StatusCode::CREATED,
            Route::LoginRefused => StatusCode::UNAUTHORIZED,
            _ => StatusCode::OK,
        }
    }
}
