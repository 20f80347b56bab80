use serde_json::Value;

use crate::helpers::{logs, spawn_app};

#[tokio::test]
async fn no_password_hash_or_token_ever_reaches_a_log_line() {
    let app = spawn_app().await;
    let password = "unmistakable-password-8c1f";
    let new_password = "another-unmistakable-password-77ab";
    let response = app.register("ann@example.com", password).await;
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.login("ann@example.com", "a-wrong-password-f00d").await;
    let login = app.login_body("ann@example.com", password).await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    // Refresh tokens, sent in a refresh, a repeat, a malformed shape and (below) a logout.
    let first_refresh = login["refresh_token"].as_str().unwrap().to_owned();
    let refreshed: Value = app.refresh(&first_refresh).await.json().await.unwrap();
    let second_refresh = refreshed["refresh_token"].as_str().unwrap().to_owned();
    app.refresh(&first_refresh).await;
    app.refresh(&format!("{second_refresh}.")).await;
    let refresh_secrets = [&first_refresh, &second_refresh]
        .map(|refresh| refresh.rsplit('.').next().unwrap().to_owned());
    let response = app
        .change_password(&id, &token, password, new_password)
        .await;
    assert_eq!(response.status(), 200);
    let response = app
        .post(
            "/logout",
            serde_json::json!({ "refresh_token": second_refresh }),
        )
        .await;
    assert_eq!(response.status(), 204);
    let hashes: Vec<String> = app
        .unsealed_messages("user")
        .await
        .iter()
        .filter_map(|(_, data, _)| data["password_hash"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(hashes.len(), 2);

    let logs = logs();
    assert!(
        logs.contains("request"),
        "the capture works: {} bytes",
        logs.len()
    );
    for secret in [
        password,
        new_password,
        "a-wrong-password-f00d",
        token.as_str(),
    ]
    .into_iter()
    .chain(refresh_secrets.iter().map(String::as_str))
    .chain(hashes.iter().map(String::as_str))
    {
        assert!(!logs.contains(secret), "a secret reached the log");
    }
    // Nor does a piece of a hash (its salt and digest).
    for hash in &hashes {
        let digest = hash.rsplit('$').next().unwrap();
        assert!(!logs.contains(digest));
    }
}
