//! The API runs as the role the PostgreSQL image creates (`docker/postgres/roles.sql`), not as
//! a superuser: that file, run against the throw-away cluster, makes a role and database in
//! which the API applies its migrations at start, creates and deletes a workspace, and cannot
//! do what only a superuser or a role with CREATEDB / CREATEROLE can.

mod common;

use common::{admin_url, Ctx};
use serde_json::json;
use sqlx::Connection;

/// The image's first-start SQL.
const ROLES_SQL: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docker/postgres/roles.sql"));

/// `DATABASE_URL` with another user, password and database (same server).
fn url_for(admin: &str, user: &str, password: &str, db: &str) -> String {
    let rest = admin.split_once("://").map(|(_, r)| r).unwrap_or(admin);
    let host_and_path = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let host = host_and_path.split('/').next().unwrap_or(host_and_path);
    let query = host_and_path.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    format!("postgres://{user}:{password}@{host}/{db}{query}")
}

/// Runs the image's SQL for `user` / `db` / `password` as the cluster's superuser, the way the
/// entrypoint does (one statement per blank-line-separated block).
async fn run_image_init(user: &str, db: &str, password: &str) {
    let sql = ROLES_SQL.replace("@USER@", user).replace("@DB@", db).replace("@PASSWORD@", password);
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.expect("connect admin");
    let mut ran = 0;
    for block in sql.split(";\n\n") {
        let statement: String =
            block.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        if statement.trim().is_empty() {
            continue;
        }
        sqlx::raw_sql(&statement).execute(&mut admin).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
        ran += 1;
    }
    assert!(ran >= 2, "roles.sql ran {ran} statements");
}

async fn drop_role(user: &str, db: &str) {
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.expect("connect admin");
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).execute(&mut admin).await;
    let _ = sqlx::query(&format!("DROP ROLE IF EXISTS \"{user}\"")).execute(&mut admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_migrates_and_operates_as_the_image_role_without_superuser_rights() {
    let mut ctx = Ctx::new("dbrole").await;
    // Names as the entrypoint accepts them: [a-z_][a-z0-9_]*.
    let suffix = ctx.deployment.trim_start_matches('t').to_string();
    let (user, db) = (format!("gg_api_{suffix}"), format!("gg_apidb_{suffix}"));
    let password = format!("pw-{suffix}");
    run_image_init(&user, &db, &password).await;

    let url = url_for(&admin_url(), &user, &password, &db);
    ctx.cfg.database_url = gpugate_api::config::Secret::new(url.clone());
    ctx.db_url = url;
    // Start = connect as the role, apply every migration, sync pools; then a whole lifecycle.
    ctx.start().await;
    let (who, superuser, createrole, createdb): (String, bool, bool, bool) = sqlx::query_as(
        "SELECT current_user::text, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(ctx.db().pool())
    .await
    .expect("role");
    assert_eq!(who, user, "the API is not connected as the image's role");
    assert!(!superuser && !createrole && !createdb, "the role has rights it should not: super {superuser}, createrole {createrole}, createdb {createdb}");

    let alice = ctx.token("alice", false).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "as-role", "services": ["ssh"]})).await;
    assert_eq!(s, 201, "create as the image's role: {v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200, "delete as the image's role: {v}");

    // What it must not be able to do.
    for forbidden in [
        "CREATE DATABASE gg_should_not_exist".to_string(),
        "CREATE ROLE gg_should_not_exist".to_string(),
        format!("ALTER ROLE \"{user}\" SUPERUSER"),
        "COPY (SELECT 1) TO PROGRAM 'true'".to_string(),
    ] {
        let err = sqlx::raw_sql(&forbidden).execute(ctx.db().pool()).await.expect_err(&forbidden);
        let code = err.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("42501"), "{forbidden}: expected insufficient privilege, got {err}");
    }

    ctx.stop().await;
    if let Some(db) = ctx.db.take() {
        db.pool().close().await;
    }
    ctx.finish().await;
    drop_role(&user, &db).await;
}
