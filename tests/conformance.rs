//! The API against its own OpenAPI document, from outside: `scripts/conformance.sh` runs
//! schemathesis (every check: its default) against this build's `delivertrack run` on the local
//! services, as an admin, a customer and a courier, about 20 s each. Any server error or
//! any answer (or acceptance) the document does not allow fails the test.
//!
//! schemathesis lives in a virtualenv (`scripts/conformance.sh --install`, which
//! `scripts/test.sh` runs first); without it the test says so loudly and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;

use delivertrack_ingest::testing::{TopologyGuard, unique_config};

/// Seconds of testing per token.
const SECONDS_PER_TOKEN: &str = "20";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_conforms_to_its_openapi_document() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var_os("CONFORMANCE_VENV")
        .map(Into::into)
        .unwrap_or_else(|| root.join("target/conformance-venv"));
    if !venv.join("bin/st").exists() {
        support::skip_without(&format!(
            "no schemathesis in {} — run `scripts/conformance.sh --install` (scripts/test.sh \
             does) to test the API against its OpenAPI document",
            venv.display()
        ));
        return;
    }
    let rabbit = unique_config("conformance");
    let _topology = TopologyGuard::new(&rabbit);
    let derived = format!("{}.derived", rabbit.exchange);
    let script = root.join("scripts/conformance.sh");
    let bin = env!("CARGO_BIN_EXE_delivertrack").to_owned();
    let (rabbit_for_run, derived_for_run) = (rabbit.clone(), derived.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(script)
            .arg(SECONDS_PER_TOKEN)
            .env("DELIVERTRACK_BIN", bin)
            .env("CONFORMANCE_VENV", venv)
            .env("RABBITMQ_URL", &rabbit_for_run.url)
            .env("DELIVERTRACK_EXCHANGE", &rabbit_for_run.exchange)
            .env("DELIVERTRACK_QUEUE", &rabbit_for_run.queue)
            .env(
                "DELIVERTRACK_DEAD_LETTER_EXCHANGE",
                &rabbit_for_run.dead_letter_exchange,
            )
            .env(
                "DELIVERTRACK_DEAD_LETTER_QUEUE",
                &rabbit_for_run.dead_letter_queue,
            )
            .env("DELIVERTRACK_DERIVED_EXCHANGE", &derived_for_run)
            .env_remove("JWT_SECRET")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let publisher = support::publisher(&rabbit).await;
    let _ = publisher
        .channel()
        .exchange_delete(
            derived.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "schemathesis found the API at odds with its document (above)"
    );
}
