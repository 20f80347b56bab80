//! Lookups by email and pages by status, for administrators.

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::harness::{assert_field_refused, assert_refused, each, spawn};

#[tokio::test]
async fn an_administrator_finds_an_account_by_email_in_any_case_or_form() {
    let app = spawn().await;
    let (_, token) = app.seed_admin().await;
    let user = app.seed_user("Zoë@Example.com", "active", &["user"]).await;

    // "Zoë" with a combining diaeresis, upper case.
    let response = app
        .get("/users?email=ZOE%CC%88%40example.COM", Some(&token))
        .await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    assert_eq!(body["items"][0]["id"], user.id.to_string());

    let response = app
        .get("/users?email=nobody%40example.com", Some(&token))
        .await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["items"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn listing_accounts_is_for_administrators_only() {
    let app = spawn().await;
    let user = app.seed_user("ann@example.com", "active", &["user"]).await;
    let token = app.token_for(user.id, &["user"]).await;
    for path in [
        "/users?status=active",
        "/users?email=ann%40example.com",
        "/users",
    ] {
        let (status, _) = app.get_problem(path, &token).await;
        assert_eq!(status, 403, "{path}");
    }
}

#[tokio::test]
async fn pages_stay_stable_while_accounts_are_added() {
    let app = spawn().await;
    let (admin, token) = app.seed_admin().await;
    let mut originals = HashSet::new();
    for n in 0..25 {
        originals.insert(
            app.seed_user(&format!("user{n}@example.com"), "active", &["user"])
                .await
                .id,
        );
    }
    app.seed_user("pending@example.com", "pending", &["user"])
        .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/users?status=active&limit=10&cursor={cursor}"),
            None => "/users?status=active&limit=10".to_owned(),
        };
        let response = app.get(&path, Some(&token)).await;
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        for item in body["items"].as_array().unwrap() {
            assert_eq!(item["status"], "active");
            seen.push(item["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
        }
        pages += 1;
        // Accounts registered while the client pages through.
        app.seed_user(&format!("late{pages}@example.com"), "active", &["user"])
            .await;
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 20, "paging does not end");
    }
    let unique: HashSet<_> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "an account came twice");
    assert!(
        originals.is_subset(&unique),
        "an account that existed all along was skipped"
    );
    assert!(unique.contains(&admin.id));
}

#[tokio::test]
async fn bad_paging_values_are_refused_with_the_field_named() {
    let app = spawn().await;
    let (_, token) = app.seed_admin().await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=1000000", "limit"),
        ("limit=99999999999999999999", "limit"),
        ("limit=ten", "limit"),
        ("limit=%2B5", "limit"),
        ("cursor=bm90LWEtY3Vyc29y", "cursor"),
        ("cursor=%%%", "cursor"),
        ("status=sleeping", "status"),
        ("email=not-an-email", "email"),
    ] {
        let answer = app.get_problem(&format!("/users?{query}"), &token).await;
        assert_field_refused(&answer, field, query);
    }
    let answer = app.get_problem("/users?page=2", &token).await;
    assert_refused(&answer, 400, "invalid_query", "page=2");
}

/// The first page of `query` and the cursor to its next one.
async fn first_cursor(app: &crate::harness::TestApp, token: &str, query: &str) -> String {
    let response = app.get(&format!("/users?{query}"), Some(token)).await;
    assert_eq!(response.status(), 200, "{query}");
    let body: serde_json::Value = response.json().await.unwrap();
    body["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("{query} has one page: {body}"))
        .to_owned()
}

#[tokio::test]
async fn a_cursor_is_taken_only_by_the_list_it_came_from() {
    let app = spawn().await;
    let (_, token) = app.seed_admin().await;
    for n in 0..3 {
        for status in ["active", "deactivated"] {
            let email = format!("{status}{n}@example.com");
            app.seed_user(&email, status, &["user"]).await;
        }
    }
    let active = first_cursor(&app, &token, "status=active&limit=1").await;
    let deactivated = first_cursor(&app, &token, "status=deactivated&limit=1").await;
    let all = first_cursor(&app, &token, "limit=1").await;

    // Each continues its own list.
    for (query, cursor) in [
        ("status=active&limit=1", &active),
        ("status=deactivated&limit=1", &deactivated),
        ("limit=1", &all),
    ] {
        let response = app
            .get(&format!("/users?{query}&cursor={cursor}"), Some(&token))
            .await;
        assert_eq!(response.status(), 200, "{query} with its own cursor");
    }
    // And no other.
    for (query, cursor) in [
        ("status=deactivated", &active),
        ("status=pending", &active),
        ("", &active),
        ("status=active", &deactivated),
        ("status=active", &all),
    ] {
        let answer = app
            .get_problem(&format!("/users?{query}&cursor={cursor}"), &token)
            .await;
        let case = format!("{query} with a cursor of another list");
        assert_field_refused(&answer, "cursor", case);
    }
}

#[tokio::test]
async fn a_cursor_this_api_did_not_give_out_is_refused_with_the_field_named() {
    let app = spawn().await;
    let (_, token) = app.seed_admin().await;
    let ann = app.seed_user("ann@example.com", "active", &["user"]).await;
    app.seed_user("bob@example.com", "active", &["user"]).await;
    let genuine = first_cursor(&app, &token, "status=active&limit=1").await;
    let bytes = URL_SAFE_NO_PAD.decode(&genuine).unwrap();
    let altered = |change: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = bytes.clone();
        change(&mut bytes);
        URL_SAFE_NO_PAD.encode(bytes)
    };

    for (case, cursor) in [
        // What this API took as a cursor before: any 16 bytes, such as an account's id.
        (
            "a bare account id",
            URL_SAFE_NO_PAD.encode(ann.id.as_bytes()),
        ),
        ("another layout", altered(&|bytes| bytes[0] = 2)),
        ("an unknown status", altered(&|bytes| bytes[1] = 9)),
        ("one byte short", altered(&|bytes| bytes.truncate(17))),
        ("one byte more", altered(&|bytes| bytes.push(0))),
        ("not base64url", format!("{genuine}=")),
        ("empty", String::new()),
    ] {
        let path = format!("/users?status=active&limit=1&cursor={cursor}");
        assert_field_refused(&app.get_problem(&path, &token).await, "cursor", case);
    }
}

#[tokio::test]
async fn an_email_lookup_refuses_status_limit_and_cursor_naming_each() {
    let app = spawn().await;
    let (_, token) = app.seed_admin().await;
    app.seed_user("ann@example.com", "active", &["user"]).await;
    app.seed_user("bob@example.com", "active", &["user"]).await;
    let cursor = first_cursor(&app, &token, "limit=1").await;

    let response = app
        .get("/users?email=ann%40example.com", Some(&token))
        .await;
    assert_eq!(response.status(), 200, "the lookup alone");
    for (extra, fields) in [
        ("status=deactivated", vec!["status"]),
        ("limit=1", vec!["limit"]),
        (&format!("cursor={cursor}") as &str, vec!["cursor"]),
        (
            &format!("status=active&limit=5&cursor={cursor}"),
            vec!["status", "limit", "cursor"],
        ),
    ] {
        let path = format!("/users?email=ann%40example.com&{extra}");
        let (status, body) = app.get_problem(&path, &token).await;
        let named = each(&body["errors"], |error| error["field"].as_str().unwrap());
        assert_eq!((status, named), (422, fields), "{extra}: {body}");
    }
}
