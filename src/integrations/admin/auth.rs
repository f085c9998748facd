//! Sign-in, sessions and CSRF tokens for the console.
//!
//! - The operator signs in with the configured token, either per request
//!   (`Authorization: Bearer <token>`) or once through the sign-in form,
//!   which creates a server-side session and sets its id in an `HttpOnly`,
//!   `SameSite=Strict` cookie (`Secure` unless the console is reached on a
//!   loopback host). Tokens are compared in constant time, over their
//!   SHA-256 so that the length does not leak either.
//! - Every session has its own random CSRF token; bearer requests share one
//!   random token per console. Every `POST` must carry it in the `csrf`
//!   form field, or it is refused with 403.
//! - The sign-in form itself is protected by a double-submit token: a random
//!   value set in a short-lived cookie and repeated in the form.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The console's token. Its `Debug` prints `[redacted]`.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token; surrounding whitespace (a trailing newline from a secrets
    /// file) is dropped.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into().trim().to_owned())
    }

    /// Whether the token is usable: not empty.
    pub fn is_configured(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether `presented` is this token (constant time; an unconfigured
    /// token matches nothing).
    pub fn matches(&self, presented: &str) -> bool {
        if !self.is_configured() {
            return false;
        }
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented.as_bytes());
        bool::from(a.as_slice().ct_eq(b.as_slice()))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken([redacted])")
    }
}

/// Whether the session cookie gets the `Secure` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CookieSecurity {
    /// `Secure` unless the request's host is a loopback name or address
    /// (`localhost`, `127.0.0.0/8`, `[::1]`), where browsers may be on plain
    /// HTTP. The default.
    #[default]
    Auto,
    /// Always `Secure` (behind a TLS-terminating proxy on any host).
    Always,
    /// Never `Secure` (plain HTTP on a private network; not recommended).
    Never,
}

impl CookieSecurity {
    /// Whether a cookie set for a request to `host` is `Secure`.
    pub fn secure_for(self, host: Option<&str>) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => !host.is_some_and(is_loopback_host),
        }
    }
}

/// Whether `host` (a `Host` header: name or address, optional port) is a
/// loopback host.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// 32 random bytes as lower-case hex.
pub(super) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // A machine without an entropy source cannot run the console safely;
    // fall back to hashing the time and address so the value is at least
    // unique (never reached on supported platforms).
    if getrandom::fill(&mut bytes).is_err() {
        let seed = format!("{:?}{:p}", Instant::now(), &bytes);
        bytes.copy_from_slice(&Sha256::digest(seed.as_bytes()));
    }
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        use fmt::Write;
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Constant-time string equality.
pub(super) fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Who is signed in, as the routes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// The name given at sign-in (or `bearer` for token requests).
    pub name: String,
    /// The CSRF token forms must carry.
    pub csrf: String,
    /// The session id, when signed in by the form.
    pub(super) session: Option<String>,
}

struct Session {
    name: String,
    csrf: String,
    expires: Instant,
}

/// Server-side sessions, bounded in number (the oldest go first).
pub(super) struct Sessions {
    ttl: Duration,
    max: usize,
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub(super) fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max: max.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a session for `name`; returns its id.
    pub(super) fn open(&self, name: &str) -> String {
        let id = random_token();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, s| s.expires > now);
        while map.len() >= self.max {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                name: name.to_owned(),
                csrf: random_token(),
                expires: now + self.ttl,
            },
        );
        id
    }

    /// The operator of a live session.
    pub(super) fn get(&self, id: &str) -> Option<Operator> {
        let now = Instant::now();
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(id).filter(|s| s.expires > now).map(|s| Operator {
            name: s.name.clone(),
            csrf: s.csrf.clone(),
            session: Some(id.to_owned()),
        })
    }

    /// Ends a session.
    pub(super) fn close(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub(super) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, scoped to `path`.
pub(super) fn set_cookie(
    name: &str,
    value: &str,
    path: &str,
    max_age: Option<Duration>,
    secure: bool,
) -> String {
    let mut out = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        use fmt::Write;
        let _ = write!(out, "; Max-Age={}", age.as_secs());
    }
    if secure {
        out.push_str("; Secure");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly_and_an_empty_token_matches_nothing() {
        let t = AdminToken::new(" s3cret\n");
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret "));
        assert!(!AdminToken::new("  ").matches(""));
        assert_eq!(format!("{t:?}"), "AdminToken([redacted])");
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:4242",
            "127.1.2.3",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "example.com",
            "10.0.0.1:80",
            "[2001:db8::1]:443",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
        assert!(!CookieSecurity::Auto.secure_for(Some("127.0.0.1:1")));
        assert!(CookieSecurity::Auto.secure_for(Some("billing.example.com")));
        assert!(CookieSecurity::Auto.secure_for(None));
        assert!(CookieSecurity::Always.secure_for(Some("localhost")));
    }

    #[test]
    fn sessions_expire_close_and_stay_bounded() {
        let s = Sessions::new(Duration::from_secs(60), 2);
        let a = s.open("ann");
        let b = s.open("bob");
        let op = s.get(&a).unwrap();
        assert_eq!(op.name, "ann");
        assert_eq!(op.csrf.len(), 64);
        assert_ne!(op.csrf, s.get(&b).unwrap().csrf);
        let c = s.open("cy");
        assert_eq!(
            [&a, &b, &c].iter().filter(|id| s.get(id).is_some()).count(),
            2,
            "at most two sessions"
        );
        s.close(&c);
        assert!(s.get(&c).is_none());
        let gone = Sessions::new(Duration::ZERO, 4);
        let id = gone.open("x");
        assert!(gone.get(&id).is_none(), "expired at once");
    }

    #[test]
    fn cookies_parse_and_render() {
        assert_eq!(cookie("a=1; swg_admin=abc; b=2", "swg_admin"), Some("abc"));
        assert_eq!(cookie("swg_admin_x=1", "swg_admin"), None);
        let v = set_cookie("swg_admin", "abc", "/admin", None, true);
        assert_eq!(
            v,
            "swg_admin=abc; Path=/admin; HttpOnly; SameSite=Strict; Secure"
        );
    }
}
