//! What the tests of the standalone process share: making its first administrator as README
//! tells an operator to.

use std::path::Path;
use std::time::Duration;

use test_support::Launch;
use test_support::process::built_binary;

/// The first administrator of the standalone process whose data is in `directory`:
/// `command-api admin create` on the same file, with the key files the process made under
/// `data/` on its first start.
pub async fn create_admin(directory: &Path, email: &str, password: &str) {
    Launch::new("admin create", built_binary("command-api").unwrap())
        .current_dir(directory)
        .env("IDENTITY__DATABASE__URL", "sqlite://data/identity.db")
        .env("IDENTITY__TOKENS__SIGNING_KEY_FILE", "data/signing-key.pem")
        .env(
            "IDENTITY__TOKENS__REFRESH_TOKEN_KEY_FILE",
            "data/refresh-token-key",
        )
        .env("IDENTITY__MAIL__TOKEN_KEY_FILE", "data/mail-token-key")
        .env(
            "IDENTITY__WEBHOOKS__SECRET_KEY_FILE",
            "data/webhook-secret-key",
        )
        .env(
            "IDENTITY__PERSONAL_DATA__MASTER_KEY_FILE",
            "data/personal-data-master-key",
        )
        .env(
            "IDENTITY__PERSONAL_DATA__LOOKUP_KEY_FILE",
            "data/personal-data-lookup-key",
        )
        .env("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
        .env("IDENTITY__PASSWORD__ITERATIONS", "1")
        .env("IDENTITY__LOG__FILTER", "warn")
        .args(["admin", "create", "--email", email])
        .log_to(directory.join("admin-create.log"))
        .run(Some(password), Duration::from_secs(60))
        .await
        .unwrap();
}
