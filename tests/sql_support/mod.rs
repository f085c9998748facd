//! Helpers shared by the SQL-backed integration tests (`pg_instances`,
//! `inbox_sql`): PostgreSQL schemas and pools, a fault-injecting TCP proxy,
//! and temporary SQLite files.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other test (or test process) uses at the same time.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The current time as Unix seconds (to sign deliveries for a processor on
/// the system clock).
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(feature = "postgres")]
pub mod pg {
    //! PostgreSQL: the server at `DATABASE_URL` (default
    //! `postgres://postgres@127.0.0.1:5432/test`), one schema per test.

    use std::time::Duration as StdDuration;

    use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
    use sqlx::{AssertSqlSafe, Connection, Row};
    use stripe_webhook_guard::store::PgStore;

    /// The server under test.
    pub fn database_url() -> String {
        std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    /// The byte range of `host[:port]` in a `postgres://` URL.
    fn host_range(url: &str) -> (usize, usize) {
        let start = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[start..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let host_start = rest[..authority_end].rfind('@').map_or(0, |i| i + 1);
        (start + host_start, start + authority_end)
    }

    /// `host:port` of the server (port 5432 when the URL has none).
    pub fn upstream_addr(url: &str) -> String {
        let (a, b) = host_range(url);
        let host = &url[a..b];
        if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_owned()
        } else {
            format!("{host}:5432")
        }
    }

    /// `url` with its host and port replaced by `addr`.
    pub fn via(url: &str, addr: &str) -> String {
        let (a, b) = host_range(url);
        format!("{}{addr}{}", &url[..a], &url[b..])
    }

    /// The URL without its password, for messages.
    pub fn redacted(url: &str) -> String {
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &url[scheme + 3..at];
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.to_owned(),
        }
    }

    /// A pool of its own on `url` (as one service instance would have).
    pub async fn pool(url: &str, max_connections: u32, acquire_timeout: StdDuration) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect(url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to PostgreSQL at {} ({e}): start a server or set DATABASE_URL",
                    redacted(url)
                )
            })
    }

    /// Drops its schema when dropped (on a separate thread and runtime, with
    /// a lock timeout so a leftover transaction cannot hang the test).
    #[derive(Debug)]
    pub struct SchemaGuard(pub String);

    impl Drop for SchemaGuard {
        fn drop(&mut self) {
            let schema = self.0.clone();
            let url = database_url();
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    if let Ok(mut conn) = PgConnection::connect(&url).await {
                        let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                            "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                        )))
                        .execute(&mut conn)
                        .await;
                        let _ = conn.close().await;
                    }
                });
            })
            .join();
        }
    }

    /// A new, migrated schema, and an admin pool straight to the server (for
    /// checks that must not go through the pools under test).
    pub async fn fresh_schema() -> (String, PgPool, SchemaGuard) {
        let schema = super::unique_name("swg_x");
        let guard = SchemaGuard(schema.clone());
        let admin = pool(&database_url(), 4, StdDuration::from_secs(30)).await;
        let store = PgStore::with_schema(admin.clone(), &schema).expect("valid schema");
        assert_eq!(store.migrate().await.expect("migrate"), 1);
        (schema, admin, guard)
    }

    /// `(state, attempts)` of an event's ledger entry, read directly.
    pub async fn ledger_state(
        admin: &PgPool,
        schema: &str,
        event_id: &str,
    ) -> Option<(String, i64)> {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT state, attempts FROM \"{schema}\".ledger WHERE event_id = $1 AND account = ''"
        )))
        .bind(event_id)
        .fetch_optional(admin)
        .await
        .expect("read the ledger")
        .map(|row| (row.get("state"), row.get("attempts")))
    }

    /// How many ledger entries are in each state.
    pub async fn ledger_states(admin: &PgPool, schema: &str) -> Vec<(String, i64)> {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT state, count(*) AS n FROM \"{schema}\".ledger GROUP BY state ORDER BY state"
        )))
        .fetch_all(admin)
        .await
        .expect("read the ledger")
        .iter()
        .map(|row| (row.get("state"), row.get("n")))
        .collect()
    }
}

pub mod proxy {
    //! A TCP proxy with a switch: `cut` closes every forwarded connection
    //! and refuses new ones (accepted, then closed at once) until `restore`.
    //!
    //! It can also reset single connections at random statements
    //! ([`Proxy::set_statement_resets`]): it reads the PostgreSQL frontend
    //! protocol from the client, and for a chosen share of the statements
    //! (simple `Query` and extended-protocol `Execute` messages) it closes
    //! that one connection, half of the time before the statement reaches
    //! the server (it never runs) and half of the time just after the
    //! statement and its `Sync` were forwarded (the server runs it, and
    //! commits it if it was not in a transaction, but the answer is lost).

    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    /// The proxy; stops (and closes everything) when dropped.
    #[derive(Debug)]
    pub struct Proxy {
        addr: SocketAddr,
        up: Arc<AtomicBool>,
        cuts: watch::Sender<u64>,
        refused: Arc<AtomicU64>,
        forwarded: Arc<AtomicU64>,
        open: Arc<AtomicUsize>,
        faults: Arc<Faults>,
        accept: JoinHandle<()>,
    }

    /// Statement-level resets: the rate (parts per million of statements)
    /// and what happened.
    #[derive(Debug, Default)]
    struct Faults {
        ppm: AtomicU32,
        statements: AtomicU64,
        before: AtomicU64,
        after: AtomicU64,
        seed: AtomicU64,
    }

    /// A small per-connection random source (SplitMix64).
    struct Rand(u64);

    impl Rand {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Forwards the client's PostgreSQL frontend messages to the server,
    /// resetting the connection at a random share of the statements (see
    /// the module docs). Returns when either side closes or a reset is due.
    async fn client_to_server(
        mut client: impl AsyncRead + Unpin,
        mut server: impl AsyncWrite + Unpin,
        faults: Arc<Faults>,
    ) {
        let mut rand = Rand(faults.seed.fetch_add(0x5851_F42D, Ordering::Relaxed));
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        let mut chunk = [0u8; 8192];
        // Untyped messages (SSLRequest, StartupMessage) come first.
        let mut started = false;
        // A reset chosen to happen once the next Sync is forwarded.
        let mut cut_after_sync = false;
        loop {
            let Ok(n) = client.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut done = 0;
            let mut cut = false;
            loop {
                let rest = &buf[done..];
                let (header, typed) = if started { (5, true) } else { (4, false) };
                if rest.len() < header {
                    break;
                }
                let at = usize::from(typed);
                let len = u32::from_be_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
                let total = at + len as usize;
                if rest.len() < total {
                    break;
                }
                if !typed && total >= 8 {
                    // StartupMessage carries protocol 3.0; SSLRequest and
                    // GSSENCRequest are followed by another untyped message.
                    let code = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
                    started = code == 196_608;
                }
                let kind = if typed { rest[0] } else { 0 };
                if typed && (kind == b'Q' || kind == b'E') {
                    faults.statements.fetch_add(1, Ordering::Relaxed);
                    let ppm = u64::from(faults.ppm.load(Ordering::Relaxed));
                    if ppm > 0 && rand.next() % 1_000_000 < ppm {
                        if rand.next().is_multiple_of(2) {
                            // Before: the statement never reaches the server.
                            faults.before.fetch_add(1, Ordering::Relaxed);
                            let _ = server.write_all(&buf[..done]).await;
                            return;
                        }
                        faults.after.fetch_add(1, Ordering::Relaxed);
                        if kind == b'Q' {
                            done += total;
                            cut = true;
                            break;
                        }
                        cut_after_sync = true;
                    }
                }
                done += total;
                if cut_after_sync && kind == b'S' {
                    cut = true;
                    break;
                }
            }
            if server.write_all(&buf[..done]).await.is_err() {
                return;
            }
            if cut {
                let _ = server.flush().await;
                // Give the server the bytes before the socket closes.
                tokio::time::sleep(Duration::from_millis(1)).await;
                return;
            }
            buf.drain(..done);
        }
    }

    /// Counts a forwarded connection until both its sockets are closed.
    struct Open(Arc<AtomicUsize>);

    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Proxy {
        /// Listens on `127.0.0.1:0`, forwarding to `upstream` (`host:port`).
        pub async fn start(upstream: String) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let up = Arc::new(AtomicBool::new(true));
            let (cuts, _) = watch::channel(0u64);
            let refused = Arc::new(AtomicU64::new(0));
            let forwarded = Arc::new(AtomicU64::new(0));
            let open = Arc::new(AtomicUsize::new(0));
            let faults = Arc::new(Faults::default());
            let accept = {
                let faults = faults.clone();
                let up = up.clone();
                let cuts = cuts.clone();
                let refused = refused.clone();
                let forwarded = forwarded.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        if !up.load(Ordering::SeqCst) {
                            refused.fetch_add(1, Ordering::SeqCst);
                            drop(client);
                            continue;
                        }
                        forwarded.fetch_add(1, Ordering::SeqCst);
                        open.fetch_add(1, Ordering::SeqCst);
                        let guard = Open(open.clone());
                        // Subscribe before checking the switch again, so a
                        // cut between accept and here is not missed.
                        let mut cut = cuts.subscribe();
                        let up = up.clone();
                        let upstream = upstream.clone();
                        let faults = faults.clone();
                        tokio::spawn(async move {
                            // Dropped last: after both sockets.
                            let _guard = guard;
                            if !up.load(Ordering::SeqCst) {
                                return;
                            }
                            let Ok(server) = TcpStream::connect(&upstream).await else {
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            let (client_rd, mut client_wr) = client.into_split();
                            let (mut server_rd, server_wr) = server.into_split();
                            tokio::select! {
                                () = client_to_server(client_rd, server_wr, faults) => {}
                                _ = tokio::io::copy(&mut server_rd, &mut client_wr) => {}
                                _ = cut.changed() => {}
                            }
                            // Both sockets are dropped here.
                        });
                    }
                })
            };
            Self {
                addr,
                up,
                cuts,
                refused,
                forwarded,
                open,
                faults,
                accept,
            }
        }

        /// Resets the connection carrying a random `share` (0 to 1) of the
        /// statements from now on (see the module docs); 0 turns it off.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0..=1e6
        pub fn set_statement_resets(&self, share: f64) {
            let ppm = (share.clamp(0.0, 1.0) * 1_000_000.0).round() as u32;
            self.faults.ppm.store(ppm, Ordering::SeqCst);
        }

        /// `(statements seen, reset before the server got them, reset
        /// after the server got them)`.
        pub fn statement_resets(&self) -> (u64, u64, u64) {
            let f = &self.faults;
            (
                f.statements.load(Ordering::Relaxed),
                f.before.load(Ordering::Relaxed),
                f.after.load(Ordering::Relaxed),
            )
        }

        /// `host:port` to connect to.
        pub fn addr(&self) -> String {
            self.addr.to_string()
        }

        /// Refuses new connections and closes every forwarded one, and
        /// returns once they are all closed (so nothing sent after this
        /// reaches the server).
        pub async fn cut(&self) {
            self.switch_off();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.open.load(Ordering::SeqCst) > 0 {
                assert!(
                    Instant::now() < deadline,
                    "the proxy's connections did not close"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        fn switch_off(&self) {
            self.up.store(false, Ordering::SeqCst);
            self.cuts.send_modify(|n| *n += 1);
        }

        /// Forwards new connections again.
        pub fn restore(&self) {
            self.up.store(true, Ordering::SeqCst);
        }

        /// Connections refused while cut.
        pub fn refused(&self) -> u64 {
            self.refused.load(Ordering::SeqCst)
        }

        /// Connections forwarded.
        pub fn forwarded(&self) -> u64 {
            self.forwarded.load(Ordering::SeqCst)
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.switch_off();
            self.accept.abort();
        }
    }
}

#[cfg(feature = "sqlite")]
pub mod lite {
    //! SQLite: a temporary database file per test.

    use std::path::PathBuf;

    /// A database file path in the temporary directory, and its guard.
    pub fn temp_db() -> (PathBuf, FileGuard) {
        let path = std::env::temp_dir().join(format!("{}.db", super::unique_name("swg_x")));
        (path.clone(), FileGuard(path))
    }

    /// Removes the database file (and its WAL and shared-memory files) when
    /// dropped.
    #[derive(Debug)]
    pub struct FileGuard(pub PathBuf);

    impl Drop for FileGuard {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = self.0.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
