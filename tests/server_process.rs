//! `examples/server.rs` as it runs in production: its `main` in a child
//! process (this test binary started again, running the ignored
//! `server_process` test), configured through the environment, stopped
//! with a real SIGTERM and started again on the same database.
#![cfg(all(unix, feature = "axum", feature = "reqwest", feature = "tracing"))]

#[allow(dead_code)]
#[path = "../examples/server.rs"]
mod server;

mod common;
mod sql_support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The variable that makes `server_process` run the server.
const CHILD: &str = "SWG_SERVER_PROCESS";

/// The child's entry point: the example's `main`, nothing else.
#[test]
#[ignore = "the server process of the other tests; they start it"]
fn server_process() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let code = i32::from(server::run_main().is_err());
    std::process::exit(code);
}

/// A running server process.
struct Process {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

/// Removes terminal colour sequences from a log line.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn spawn(
    env: &[(&str, String)],
) -> (
    Child,
    Arc<Mutex<String>>,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let exe = std::env::current_exe().expect("test binary");
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            "server_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL")
        .env_remove("ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start the server process");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let sink = log.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = plain(&line);
            eprintln!("  [server] {line}");
            sink.lock().unwrap().push_str(&line);
            sink.lock().unwrap().push('\n');
            let _ = tx.send(line);
        }
    });
    (child, log, rx)
}

impl Process {
    /// Starts the server on an ephemeral port with `env` (plus the webhook
    /// secret) and waits until it listens.
    async fn start(env: &[(&str, String)]) -> Self {
        let mut all = vec![
            ("STRIPE_WEBHOOK_SECRET", common::SECRET.to_owned()),
            ("BIND", "127.0.0.1:0".to_owned()),
        ];
        all.extend(env.iter().cloned());
        let (child, log, mut lines) = spawn(&all);
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.recv().await {
                if line.contains("listening")
                    && let Some(rest) = line.split("addr=").nth(1)
                {
                    return rest.split_whitespace().next().map(str::to_owned);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the server did not start:\n{}", log.lock().unwrap()));
        Self { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn deliver(&self, body: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(self.url("/webhooks/stripe"))
            .header(
                "Stripe-Signature",
                common::sign(body, sql_support::now_unix()),
            )
            .body(body.to_owned())
            .send()
            .await
            .expect("delivery");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON"))
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = reqwest::Client::new().get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON"))
    }

    /// Sends SIGTERM; returns whether it exited successfully and how long
    /// it took.
    async fn terminate(mut self, limit: Duration) -> (bool, Duration, String) {
        let pid = self.child.id().expect("running");
        let started = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running {limit:?} after SIGTERM:\n{}", self.log()))
            .expect("wait");
        // The last lines reach the reader after the exit.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (exit.success(), started.elapsed(), self.log())
    }
}

/// Regression (issue 12 item 2), as it happened in production: the request
/// timeout (1 s) answers 503 while the handler (8 s) goes on; SIGTERM comes
/// mid-work. Before, the process exited at once leaving the claim
/// `processing` with most of its lease left, and Stripe's retry after the
/// restart got 503 "in flight". Now shutdown waits until its deadline (2 s),
/// aborts the work, releases the claim, and the retry is processed.
async fn sigterm_mid_request_then_the_retry_is_processed(db: &[(&str, String)], id: &str) {
    let mut env = vec![
        ("REQUEST_TIMEOUT_SECS", "1".to_owned()),
        ("DEMO_HANDLER_DELAY_MS", "8000".to_owned()),
        ("SHUTDOWN_DEADLINE_SECS", "2".to_owned()),
    ];
    env.extend(db.iter().cloned());
    let server = Process::start(&env).await;
    let body = common::sub_event(
        id,
        "customer.subscription.created",
        sql_support::now_unix() - 5,
        &format!("sub_{id}"),
        "active",
    );
    let (status, json) = server.deliver(&body).await;
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["error"], "timeout");

    let (clean, took, log) = server.terminate(Duration::from_secs(15)).await;
    assert!(clean, "exit status after SIGTERM:\n{log}");
    assert!(
        took < Duration::from_secs(6),
        "shutdown took {took:?} (deadline 2 s)"
    );
    let first_log = log;

    // Restarted (handler fast now): Stripe's retry is processed at once.
    "0".clone_into(&mut env[1].1);
    let server = Process::start(&env).await;
    let (status, json) = server.deliver(&body).await;
    assert_eq!(
        (status, json["outcome"].as_str()),
        (200, Some("applied")),
        "Stripe's retry after the restart: {json}"
    );
    assert!(
        first_log.contains("released=1"),
        "the claim was released:\n{first_log}"
    );
    let (status, counters) = server.get("/stats", None).await;
    assert_eq!(status, 200);
    assert_eq!(counters["handler_effects"], 1, "{counters}");
    let (clean, _, log) = server.terminate(Duration::from_secs(15)).await;
    assert!(clean, "{log}");
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_request_releases_the_claim_on_postgres() {
    let schema = sql_support::unique_name("swg_srv");
    let _guard = sql_support::pg::SchemaGuard(schema.clone());
    let db = [
        ("DATABASE_URL", sql_support::pg::database_url()),
        ("DATABASE_SCHEMA", schema),
    ];
    sigterm_mid_request_then_the_retry_is_processed(&db, "evt_sigterm_pg").await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_request_releases_the_claim_on_sqlite() {
    let dir = std::env::temp_dir().join(sql_support::unique_name("swg-server-process"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = [(
        "DATABASE_URL",
        format!("sqlite://{}", dir.join("billing.db").display()),
    )];
    sigterm_mid_request_then_the_retry_is_processed(&db, "evt_sigterm_sqlite").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regression (issue 12 item 3): a client stalled in its request head does
/// not hold SIGTERM beyond the shutdown deadline (before, the process
/// waited until the client left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_stalled_client() {
    let server = Process::start(&[
        ("HEADER_TIMEOUT_SECS", "60".to_owned()),
        ("SHUTDOWN_DEADLINE_SECS", "1".to_owned()),
    ])
    .await;
    let mut stalled = TcpStream::connect(&server.addr).await.unwrap();
    stalled
        .write_all(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Le")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (clean, took, log) = server.terminate(Duration::from_secs(10)).await;
    assert!(clean, "{log}");
    assert!(
        took < Duration::from_secs(4),
        "SIGTERM waited {took:?} (deadline 1 s)"
    );
}

/// Regression (issue 12 items 4 and 5): the in-memory store is announced
/// loudly and named by `/healthz`; a failed admin attempt is logged with
/// its peer; admin routes without a token on a public bind refuse to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_warnings_and_admin_failures_are_logged() {
    let token = "process-admin-token-0123";
    let server = Process::start(&[("ADMIN_TOKEN", token.to_owned())]).await;
    assert!(
        server.log().contains("WARN") && server.log().contains("IN-MEMORY store"),
        "{}",
        server.log()
    );
    let (status, health) = server.get("/healthz", None).await;
    assert_eq!(status, 200);
    assert_eq!(health["store"], "memory");
    assert_eq!(health["durable"], false);

    let (status, json) = server.get("/stats", Some("a-wrong-guess")).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = server.get("/stats", Some(token)).await;
    assert_eq!(status, 200);
    let (clean, _, log) = server.terminate(Duration::from_secs(10)).await;
    assert!(clean, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("admin authentication failed"))
        .unwrap_or_else(|| panic!("no failure logged:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("peer=\"127.0.0.1:"), "{line}");
    assert!(line.contains("failures=1"), "{line}");
    assert!(line.contains("path=\"/stats\""), "{line}");
    assert!(
        !log.contains(token) && !log.contains("a-wrong-guess"),
        "no token in the log"
    );

    // No token, public bind: a clear start-up error, exit status 1.
    let (mut child, log, _) = spawn(&[
        ("STRIPE_WEBHOOK_SECRET", common::SECRET.to_owned()),
        ("BIND", "0.0.0.0:0".to_owned()),
    ]);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits")
        .expect("wait");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = log.lock().unwrap().clone();
    assert!(!status.success());
    assert!(log.contains("ADMIN_TOKEN is not set"), "{log}");
    assert!(!log.contains("listening"), "{log}");
}
