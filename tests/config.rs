//! The configuration of the README works as written, through the real binary:
//!
//! - [`a_jwt_secret_shorter_than_32_bytes_is_refused_unless_insecure`]: `run` and `token`
//!   refuse it before anything opens, naming `JWT_SECRET` and its length, and exit 1;
//!   `--insecure-dev-secret` (or `DELIVERTRACK_INSECURE_DEV_SECRET=true`) lets it through.
//! - [`jwt_expiry_takes_a_duration_with_its_unit`]: `JWT_EXPIRY=24h` signs a token that
//!   lives 24 hours.
//! - [`run_connects_with_a_rabbitmq_url_ending_in_a_slash`]: `amqp://...:5672/` is the
//!   default vhost `/`, against the real RabbitMQ.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use delivertrack_ingest::testing::{delete_topology, unique_config};
use tokio::time::timeout;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(120);

/// A secret of 31 bytes: one short.
const SHORT_SECRET: &str = "0123456789abcdef0123456789abcde";
/// A secret of 32 bytes.
const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// Runs the binary to its end with `args` and `env`; returns its exit code, stdout, stderr.
async fn binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"));
    command
        .args(args)
        .env_remove("JWT_SECRET")
        .env_remove("JWT_EXPIRY")
        .env_remove("DELIVERTRACK_INSECURE_DEV_SECRET")
        .env_remove("DATABASE_URL")
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = timeout(PATIENCE, command.output()).await.unwrap().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `run` with no store and an unreachable broker: it gets as far as RabbitMQ only if the
/// secret passed.
const RUN_WITHOUT_SERVICES: [&str; 8] = [
    "run",
    "--listen",
    "127.0.0.1:0",
    "--no-postgres",
    "--no-redis",
    "--no-mongo",
    "--no-derived",
    "--log-format=json",
];
const NO_BROKER: (&str, &str) = ("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:1/");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_secret_shorter_than_32_bytes_is_refused_unless_insecure() {
    let (code, stdout, stderr) = binary(
        &RUN_WITHOUT_SERVICES,
        &[("JWT_SECRET", SHORT_SECRET), NO_BROKER],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("error: JWT_SECRET is 31 bytes long; it must be at least 32 bytes"),
        "{stderr}"
    );
    assert!(stderr.contains("--insecure-dev-secret"), "{stderr}");
    assert!(
        !stderr.contains("RabbitMQ"),
        "refused before anything opened: {stderr}"
    );

    // `token` refuses it the same way, and prints no token.
    let sub = Uuid::new_v4().to_string();
    let token = ["token", "--role", "admin", "--sub", sub.as_str()];
    let (code, stdout, stderr) = binary(&token, &[("JWT_SECRET", SHORT_SECRET)]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("JWT_SECRET is 31 bytes long"), "{stderr}");

    // 32 bytes pass: `run` goes on to the (unreachable) broker.
    let (code, _, stderr) =
        binary(&RUN_WITHOUT_SERVICES, &[("JWT_SECRET", SECRET), NO_BROKER]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("RabbitMQ at amqp://"), "{stderr}");
    assert!(!stderr.contains("JWT_SECRET"), "{stderr}");

    // So does a short one on a developer's machine, by flag or by environment.
    let mut insecure = RUN_WITHOUT_SERVICES.to_vec();
    insecure.push("--insecure-dev-secret");
    let (_, _, stderr) = binary(&insecure, &[("JWT_SECRET", SHORT_SECRET), NO_BROKER]).await;
    assert!(stderr.contains("RabbitMQ at amqp://"), "{stderr}");
    let (_, _, stderr) = binary(
        &RUN_WITHOUT_SERVICES,
        &[
            ("JWT_SECRET", SHORT_SECRET),
            ("DELIVERTRACK_INSECURE_DEV_SECRET", "true"),
            NO_BROKER,
        ],
    )
    .await;
    assert!(stderr.contains("RabbitMQ at amqp://"), "{stderr}");
    let (code, stdout, _) = binary(
        &token,
        &[
            ("JWT_SECRET", "dev"),
            ("DELIVERTRACK_INSECURE_DEV_SECRET", "1"),
        ],
    )
    .await;
    assert_eq!(code, Some(0));
    assert_eq!(stdout.lines().count(), 1);
}

/// The claims of a JWT (its middle part, base64url without padding), undecoded by any
/// library the binary uses.
fn claims(token: &str) -> serde_json::Value {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let mut bits: u32 = 0;
    let mut held = 0;
    let mut bytes = Vec::new();
    for c in payload.bytes() {
        let value = ALPHABET.iter().position(|&a| a == c).expect("base64url") as u32;
        bits = (bits << 6) | value;
        held += 6;
        if held >= 8 {
            held -= 8;
            bytes.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_expiry_takes_a_duration_with_its_unit() {
    let sub = Uuid::new_v4().to_string();
    let token = ["token", "--role", "courier", "--sub", sub.as_str()];
    for (expiry, seconds) in [
        ("24h", 86_400),
        ("15m", 900),
        ("3600s", 3_600),
        ("3600", 3_600),
    ] {
        let (code, stdout, stderr) =
            binary(&token, &[("JWT_SECRET", SECRET), ("JWT_EXPIRY", expiry)]).await;
        assert_eq!(code, Some(0), "JWT_EXPIRY={expiry}: {stderr}");
        let claims = claims(stdout.trim());
        let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
        assert_eq!(lifetime, seconds, "JWT_EXPIRY={expiry}: {claims}");
    }
    // A value that is no duration is refused by name.
    let (code, stdout, stderr) =
        binary(&token, &[("JWT_SECRET", SECRET), ("JWT_EXPIRY", "a day")]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(stderr.contains("JWT_EXPIRY"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_connects_with_a_rabbitmq_url_ending_in_a_slash() {
    let rabbit = unique_config("config-slash");
    // The suite's broker url, written as the README's seed does: `.../` for the vhost `/`.
    let url = rabbit
        .url
        .strip_suffix("%2f")
        .or_else(|| rabbit.url.strip_suffix("%2F"))
        .map(str::to_owned)
        .unwrap_or_else(|| rabbit.url.clone());
    assert!(url.ends_with(":5672/") || url.ends_with('/'), "{url}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(["run", "--listen", "127.0.0.1:0"])
        .args(["--exchange", &rabbit.exchange, "--queue", &rabbit.queue])
        .args(["--dead-letter-exchange", &rabbit.dead_letter_exchange])
        .args(["--dead-letter-queue", &rabbit.dead_letter_queue])
        .args(["--no-postgres", "--no-redis", "--no-mongo", "--no-derived"])
        .env("RABBITMQ_URL", &url)
        .env("JWT_SECRET", SECRET)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = support::banner_address(&mut child, PATIENCE).await;
    let readyz = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 200, "connected to the vhost /");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    let status = timeout(PATIENCE, child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    delete_topology(&rabbit).await;
}
