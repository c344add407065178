//! `delivertrack migrate` against the real PostgreSQL: it creates the schema, running it
//! again changes nothing, and an unreachable database is an error naming it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The server's maintenance database, where test databases are created and dropped.
fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `admin_url` with another database name.
fn url_of(database: &str) -> String {
    let admin = admin_url();
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    format!("{base}/{database}")
}

fn migrate(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(["migrate", "--database-url", url])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap()
}

#[tokio::test]
async fn migrate_creates_the_schema_once_and_again_changes_nothing() {
    let database = format!("delivertrack_migrate_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await
        .unwrap();

    let first = migrate(&url_of(&database));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let mut db = PgConnection::connect(&url_of(&database)).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    for table in [
        "deliveries",
        "couriers",
        "customers",
        "delivery_events",
        "location_fixes",
        "metrics",
        "zones",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut db)
        .await
        .unwrap();

    let second = migrate(&url_of(&database));
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(again, applied, "a second run applies nothing");
    db.close().await.unwrap();

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}

#[test]
fn an_unreachable_database_is_an_error_naming_it() {
    let output = migrate("postgres://postgres@127.0.0.1:1/delivertrack");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}
