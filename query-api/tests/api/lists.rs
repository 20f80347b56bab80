//! Lookups by email and pages by status, for administrators.

use std::collections::HashSet;

use crate::harness::{problem, spawn};

#[tokio::test]
async fn an_administrator_finds_an_account_by_email_in_any_case_or_form() {
    let app = spawn().await;
    let admin = app
        .seed_user("root@example.com", "active", &["admin"])
        .await;
    let user = app.seed_user("Zoë@Example.com", "active", &["user"]).await;
    let token = app.token_for(admin.id, &["admin"]);

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
    let token = app.token_for(user.id, &["user"]);
    for path in [
        "/users?status=active",
        "/users?email=ann%40example.com",
        "/users",
    ] {
        let (status, _) = problem(app.get(path, Some(&token)).await).await;
        assert_eq!(status, 403, "{path}");
    }
}

#[tokio::test]
async fn pages_stay_stable_while_accounts_are_added() {
    let app = spawn().await;
    let admin = app
        .seed_user("root@example.com", "active", &["admin"])
        .await;
    let token = app.token_for(admin.id, &["admin"]);
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
    let admin = app
        .seed_user("root@example.com", "active", &["admin"])
        .await;
    let token = app.token_for(admin.id, &["admin"]);
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
        let (status, body) = problem(app.get(&format!("/users?{query}"), Some(&token)).await).await;
        assert_eq!(status, 422, "{query}");
        assert_eq!(body["errors"][0]["field"], field, "{query}");
    }
    let (status, body) = problem(app.get("/users?page=2", Some(&token)).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_query"))
    );
}
