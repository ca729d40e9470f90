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

/// The gateway role's SQL (docker/postgres/gateway-role.sql).
const GATEWAY_SQL: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docker/postgres/gateway-role.sql"));

/// A gateway's publisher runs with its own role (issue: gateways held the owner's password,
/// could read every workspace's credentials and had to migrate): it publishes the routes, and
/// it cannot read environments or users, change the schema, or write another gateway's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_publishes_with_a_role_that_reads_routes_and_writes_its_own_row_only() {
    let mut ctx = Ctx::new("gwrole").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let suffix = ctx.deployment.trim_start_matches('t').to_string();
    let gateway = format!("gg_gw_{suffix}");
    let password = format!("pw-{suffix}");
    let mut admin = sqlx::PgConnection::connect(&url_for(&admin_url(), "postgres", "", &ctx.db_name)).await.expect("connect admin");
    let sql = GATEWAY_SQL.replace("@GATEWAY@", &gateway).replace("@DB@", &ctx.db_name).replace("@PASSWORD@", &password);
    for block in sql.split(";\n\n") {
        let statement: String =
            block.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        if !statement.trim().is_empty() {
            sqlx::raw_sql(&statement).execute(&mut admin).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
    }

    let gw_url = url_for(&admin_url(), &gateway, &password, &ctx.db_name);
    let table = ctx.dir.join("gw").join("routes");
    let table_s = table.display().to_string();
    let (_, base) = ctx.spawn(
        &["publish"],
        &[("DATABASE_URL", &gw_url), ("GPUGATE_ROUTE_TABLE", &table_s), ("GPUGATE_GATEWAY_NAME", &gateway)],
    );
    ctx.wait_healthy(&base).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "via-gw-role"})).await;
    assert_eq!(s, 201, "{v}");
    let port = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
    let published = common::eventually(std::time::Duration::from_secs(10), || {
        gpugate_routes::Table::open_read_only(&table)
            .is_ok_and(|t| matches!(t.lookup(port, gpugate_routes::now_ms()), gpugate_routes::Lookup::Live(_)))
    })
    .await;
    assert!(published, "the gateway role's publisher never published the route");
    let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM gateways WHERE name = $1")
        .bind(&gateway)
        .fetch_one(ctx.db().pool())
        .await
        .expect("count");
    assert_eq!(registered, 1, "the gateway's own row");

    let mut gw = sqlx::PgConnection::connect(&gw_url).await.expect("connect as the gateway");
    for forbidden in [
        "SELECT password FROM environments LIMIT 1",
        "SELECT * FROM users LIMIT 1",
        "SELECT * FROM api_tokens LIMIT 1",
        "UPDATE routes SET active = false",
        "CREATE TABLE gg_should_not_exist (x int)",
    ] {
        let err = sqlx::raw_sql(forbidden).execute(&mut gw).await.expect_err(forbidden);
        let code = err.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("42501"), "{forbidden}: expected insufficient privilege, got {err}");
    }
    // Another gateway's row can be neither written nor forged.
    let err = sqlx::raw_sql(
        "INSERT INTO gateways (name, heartbeat_ms, heartbeat_at, last_sync_at, started_at, table_path, pid, version) \
         VALUES ('someone-else', 1000, now(), now(), now(), '/x', 1, 'x')",
    )
    .execute(&mut gw)
    .await
    .expect_err("forged row");
    assert_eq!(err.as_database_error().and_then(|d| d.code()).as_deref(), Some("42501"), "{err}");
    drop(gw);
    drop(admin);
    ctx.finish().await;
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.expect("connect admin");
    let _ = sqlx::query(&format!("DROP ROLE IF EXISTS \"{gateway}\"")).execute(&mut admin).await;
}
