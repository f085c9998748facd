//! PostgreSQL helpers of the `postgres` and `growth` benchmarks: the server
//! at `DATABASE_URL` (skipped when unset), a fresh schema per run, pools,
//! processors over [`PgStore`], running operations with a fixed number in
//! flight, and a TCP proxy that counts the wire protocol's messages (round
//! trips and statements).
#![allow(dead_code)]

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Executor};
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::inbox::{Inbox, InboxConfig};
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::PgStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{SECRET, T};

/// The server under test, or `None` (the benchmark is then skipped).
pub fn database_url() -> Option<String> {
    std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty())
}

/// Prints why a PostgreSQL benchmark does not run.
pub fn skip_message(bench: &str) {
    println!(
        "{bench}: DATABASE_URL is not set; skipping the PostgreSQL benchmarks \
         (e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench {bench})"
    );
}

/// A multi-threaded runtime with two workers (the machine's cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A pool of `size` connections with sqlx's default options otherwise
/// (including `test_before_acquire(true)`: a ping on every acquire), or
/// without the ping.
pub async fn pool(options: &PgConnectOptions, size: u32, ping_on_acquire: bool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .test_before_acquire(ping_on_acquire)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(options.clone())
        .await
        .expect("connect to DATABASE_URL")
}

/// The connection options of `url`.
pub fn options(url: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(url).expect("a postgres URL")
}

static SCHEMAS: AtomicU64 = AtomicU64::new(0);

/// A fresh, migrated schema, dropped by [`Schema::drop_now`].
pub struct Schema {
    pub name: String,
    admin: PgPool,
}

impl Schema {
    /// Creates and migrates `swg_bench_<pid>_<n>`.
    pub async fn fresh(admin: &PgPool) -> Self {
        let name = format!(
            "swg_bench_{}_{}",
            std::process::id(),
            SCHEMAS.fetch_add(1, Ordering::Relaxed)
        );
        let store = PgStore::with_schema(admin.clone(), &name).expect("valid schema");
        store.migrate().await.expect("migrate");
        Self {
            name,
            admin: admin.clone(),
        }
    }

    /// A store over `pool` in this schema.
    pub fn store(&self, pool: &PgPool) -> Arc<PgStore> {
        Arc::new(PgStore::with_schema(pool.clone(), &self.name).expect("valid schema"))
    }

    /// Runs SQL in this schema (`{s}` is replaced by the quoted name).
    pub async fn sql(&self, sql: &str) {
        let sql = sql.replace("{s}", &format!("\"{}\"", self.name));
        self.admin
            .execute(AssertSqlSafe(sql))
            .await
            .expect("bench SQL");
    }

    /// Drops the schema.
    pub async fn drop_now(self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
        let _ = self.admin.execute(AssertSqlSafe(sql)).await;
    }
}

/// The floor's table: an event id and the delivery's body.
pub const FLOOR_TABLE: &str = "CREATE TABLE {s}.floor (event_id text COLLATE \"C\" PRIMARY KEY, \
     payload text NOT NULL)";

/// The floor: one plain single-row `INSERT … ON CONFLICT DO NOTHING`.
pub fn floor_insert(schema: &str) -> String {
    format!(
        "INSERT INTO \"{schema}\".floor (event_id, payload) VALUES ($1, $2) \
         ON CONFLICT DO NOTHING"
    )
}

/// A synchronous processor over `store` on a manual clock at [`T`] (the
/// deliveries are signed at `T`; leases run on the database's clock).
pub fn processor(store: Arc<PgStore>) -> WebhookProcessor {
    let clock = ManualClock::at_unix(T);
    WebhookProcessor::builder(Verifier::new(SECRET))
        .store(store)
        .clock(Arc::new(clock))
        .build()
}

/// An inbox over `store` on a manual clock at [`T`].
pub fn inbox(store: Arc<PgStore>) -> Inbox {
    let clock = ManualClock::at_unix(T);
    WebhookProcessor::builder(Verifier::new(SECRET))
        .store(store)
        .clock(Arc::new(clock))
        .build_inbox(InboxConfig::default())
}

/// Runs `op(0..n)` with `concurrency` operations in flight; returns the
/// wall time and, when `latencies`, each operation's latency.
pub async fn run_concurrent<F, Fut>(
    concurrency: usize,
    n: u64,
    latencies: bool,
    op: F,
) -> (Duration, Vec<Duration>)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let op = Arc::clone(&op);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return mine;
                }
                let t0 = Instant::now();
                op(i).await;
                if latencies {
                    mine.push(t0.elapsed());
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("a bench task"));
    }
    (start.elapsed(), all)
}

/// The `q`-quantile of sorted latencies.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Messages a client sent through the [`CountingProxy`] (frontend messages
/// of the PostgreSQL wire protocol).
#[derive(Debug, Default)]
pub struct WireCounts {
    /// `Sync`: the end of an extended-protocol exchange; the client then
    /// waits for `ReadyForQuery`, so each is one round trip. sqlx's ping is
    /// a lone `Sync`.
    pub sync: AtomicU64,
    /// `Query`: a simple-protocol statement (one round trip).
    pub query: AtomicU64,
    /// `Execute`: an extended-protocol statement run.
    pub execute: AtomicU64,
    /// `Parse`: a statement prepared (sqlx caches prepared statements per
    /// connection, so this stays near zero once warm).
    pub parse: AtomicU64,
}

impl WireCounts {
    /// (round trips, statements, prepares).
    pub fn snapshot(&self) -> (u64, u64, u64) {
        let sync = self.sync.load(Ordering::Relaxed);
        let query = self.query.load(Ordering::Relaxed);
        let execute = self.execute.load(Ordering::Relaxed);
        (
            sync + query,
            execute + query,
            self.parse.load(Ordering::Relaxed),
        )
    }
}

/// A TCP proxy to the server that counts the messages clients send.
pub struct CountingProxy {
    /// How to connect through the proxy (TLS off, so it can read).
    pub options: PgConnectOptions,
    /// The counts so far.
    pub counts: Arc<WireCounts>,
}

impl CountingProxy {
    /// Listens on a free local port and forwards to the server of `url`.
    pub async fn start(options: &PgConnectOptions) -> Self {
        let upstream = format!("{}:{}", options.get_host(), options.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let counts = Arc::new(WireCounts::default());
        let c = Arc::clone(&counts);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(pipe(client, server, Arc::clone(&c)));
            }
        });
        Self {
            options: options
                .clone()
                .host("127.0.0.1")
                .port(port)
                .ssl_mode(PgSslMode::Disable),
            counts,
        }
    }
}

async fn pipe(client: TcpStream, server: TcpStream, counts: Arc<WireCounts>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let down = tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
    let mut parser = Frontend::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        parser.feed(&buf[..n], &counts);
        if sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = sw.shutdown().await;
    down.abort();
}

/// Splits the client's byte stream into messages: first the untyped
/// startup message (length-prefixed), then `type, length, body`.
#[derive(Default)]
struct Frontend {
    started: bool,
    header: Vec<u8>,
    skip: usize,
}

impl Frontend {
    fn feed(&mut self, mut bytes: &[u8], counts: &WireCounts) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let need = if self.started { 5 } else { 4 };
            let n = (need - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() < need {
                return;
            }
            let len_at = need - 4;
            let len = u32::from_be_bytes(
                self.header[len_at..need]
                    .try_into()
                    .expect("four length bytes"),
            ) as usize;
            if self.started {
                let counter = match self.header[0] {
                    b'S' => Some(&counts.sync),
                    b'Q' => Some(&counts.query),
                    b'E' => Some(&counts.execute),
                    b'P' => Some(&counts.parse),
                    _ => None,
                };
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.started = true;
            self.skip = len.saturating_sub(4);
            self.header.clear();
        }
    }
}
