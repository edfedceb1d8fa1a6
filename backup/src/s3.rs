//! A repository in an S3 bucket, on any S3-compatible server: [`S3Backend`], over the
//! `object_store` crate with path-style requests (`https://host/bucket/key`).
//!
//! Every repository file is one object, `prefix/` + its name, written by a single PUT (packs are
//! at most a few tens of MiB), which S3 makes whole or absent. Plain `http://` is taken only
//! for a loopback endpoint (a server on this machine); anywhere else it is refused.
//!
//! [`Backend`] is synchronous and the repository calls it from several plain OS threads at
//! once, so an `S3Backend` owns a small tokio runtime and blocks on it for each call. It must
//! not be called from inside a tokio runtime: such a call returns an error instead of blocking
//! that runtime's thread (wrap it in `tokio::task::spawn_blocking`).

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use crate::BackupError;
use crate::backend::{Backend, MAX_WHOLE, check_name};

/// The region requests are signed for when none is given (what most S3-compatible servers
/// expect).
pub const DEFAULT_REGION: &str = "us-east-1";

/// Tries of one request (after the first), and how long the tries of one request may take in
/// all. Errors a retry cannot mend (403, 404, …) are not retried.
const MAX_RETRIES: usize = 5;
const RETRY_TIMEOUT: Duration = Duration::from_secs(180);
/// One request, connect to last byte: a 16 MiB pack at 1 Mbit/s takes 134 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a repository is in S3, and the credentials for it.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `https://host[:port]` (`http://` only for a loopback host).
    pub endpoint: String,
    pub bucket: String,
    /// The folder in the bucket (`/`-separated, may be empty).
    pub prefix: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl Default for S3Config {
    fn default() -> S3Config {
        S3Config {
            endpoint: String::new(),
            bucket: String::new(),
            prefix: String::new(),
            region: DEFAULT_REGION.into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
        }
    }
}

/// Never shows the secret.
impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .finish()
    }
}

/// Whether `host` is this machine: 127.0.0.0/8, ::1 or `localhost`.
fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

fn refuse(what: String) -> BackupError {
    BackupError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, what))
}

impl S3Config {
    /// A repository location `s3:https://host[:port]/bucket[/prefix]` (the `s3:` is optional
    /// here), with these credentials and the default region.
    pub fn from_location(
        location: &str,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<S3Config, BackupError> {
        let text = location.strip_prefix("s3:").unwrap_or(location);
        let bad = |why: &str| {
            refuse(format!(
                "{location}: {why} (an S3 repository is s3:https://host[:port]/bucket[/prefix])"
            ))
        };
        let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        // The URL parser resolves `a/../b` to `b` (`%2e` is a dot to it): refuse those instead.
        let raw = text.split_once("://").map_or(text, |(_, rest)| rest);
        if raw.contains('%') || raw.split('/').any(|p| p == "." || p == "..") {
            return Err(bad("%-escapes, . and .. are not parts of a location"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials do not go in the location: give --s3-credentials-file",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a query or fragment is not part of a location"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        let mut parts = url.path().trim_matches('/').splitn(2, '/');
        let bucket = parts.next().unwrap_or_default();
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let config = S3Config {
            endpoint: url.origin().ascii_serialization(),
            bucket: bucket.into(),
            prefix: parts.next().unwrap_or_default().into(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            ..S3Config::default()
        };
        config.check()?;
        Ok(config)
    }

    /// Refuses what would not be safe or would not work: plain HTTP off this machine, a
    /// bucket or prefix that is not plain, missing credentials.
    pub fn check(&self) -> Result<(), BackupError> {
        let url = url::Url::parse(&self.endpoint)
            .map_err(|e| refuse(format!("S3 endpoint {:?}: {e}", self.endpoint)))?;
        let host = url
            .host()
            .ok_or_else(|| refuse(format!("S3 endpoint {}: no host", self.endpoint)))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                if !is_loopback(&host) {
                    return Err(refuse(format!(
                        "S3 endpoint {}: plain http:// is allowed only to a loopback address \
                         (127.0.0.0/8, ::1, localhost); use https://",
                        self.endpoint
                    )));
                }
            }
            other => {
                return Err(refuse(format!(
                    "S3 endpoint {}: scheme {other:?}, not https",
                    self.endpoint
                )));
            }
        }
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err(refuse(format!(
                "S3 endpoint {}: only scheme, host and port (the bucket is separate)",
                self.endpoint
            )));
        }
        let b = self.bucket.as_bytes();
        let bucket_ok = (3..=63).contains(&b.len())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric();
        if !bucket_ok {
            return Err(refuse(format!(
                "S3 bucket {:?}: 3 to 63 lowercase letters, digits, - and .",
                self.bucket
            )));
        }
        if !self.prefix.is_empty() && check_name(&self.prefix).is_err() {
            return Err(refuse(format!(
                "S3 prefix {:?}: /-separated parts of letters, digits, -, _ and . (not \
                 starting with .)",
                self.prefix
            )));
        }
        if self.region.is_empty() {
            return Err(refuse("S3 region: empty".into()));
        }
        if self.access_key_id.is_empty() || self.secret_access_key.is_empty() {
            return Err(refuse(format!(
                "S3 bucket {} at {}: the access key ID or the secret access key is empty",
                self.bucket, self.endpoint
            )));
        }
        Ok(())
    }
}

/// The credentials file: TOML with `access_key_id = "…"` and `secret_access_key = "…"`.
/// `what` names the file in errors; no error quotes the file's text.
pub fn credentials_from_toml(text: &str, what: &str) -> Result<(String, String), BackupError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Creds {
        access_key_id: String,
        secret_access_key: String,
    }
    let c: Creds = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!(" (line {})", text[..s.start].lines().count().max(1)))
            .unwrap_or_default();
        refuse(format!(
            "{what}: {}{line}; it holds access_key_id = \"…\" and secret_access_key = \"…\"",
            e.message()
        ))
    })?;
    if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
        return Err(refuse(format!(
            "{what}: access_key_id or secret_access_key is empty"
        )));
    }
    Ok((c.access_key_id, c.secret_access_key))
}

/// A repository under a prefix of an S3 bucket.
pub struct S3Backend {
    store: AmazonS3,
    rt: tokio::runtime::Runtime,
    endpoint: String,
    bucket: String,
    prefix: String,
}

/// The HTTP client's options for a checked `config`.
fn client_options(config: &S3Config) -> ClientOptions {
    let http = config.endpoint.starts_with("http:");
    let client = ClientOptions::new()
        .with_allow_http(http)
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT);
    let loopback = url::Url::parse(&config.endpoint)
        .ok()
        .is_some_and(|u| u.host().is_some_and(|h| is_loopback(&h)));
    if !loopback {
        return client;
    }
    // reqwest (under object_store) sends every request through HTTP_PROXY / HTTPS_PROXY /
    // ALL_PROXY from the environment unless NO_PROXY names the host, and such lists seldom name
    // 127.0.0.1: a server on this machine would be asked through a proxy, which cannot reach
    // it or carries the repository's traffic (plain HTTP allowed here) off the machine.
    // ClientOptions cannot turn the environment's proxies off, but a proxy given here replaces
    // them: one that every loopback host is excluded from is never used. Its address is the
    // discard port on this machine, so a request that still went to it would fail, not leave.
    client
        .with_proxy_url("http://127.0.0.1:9")
        .with_proxy_excludes("localhost,127.0.0.0/8,::1")
}

impl S3Backend {
    /// Checks `config` ([`S3Config::check`]) and makes the client; nothing is sent yet.
    pub fn new(config: &S3Config) -> Result<S3Backend, BackupError> {
        config.check()?;
        let client = client_options(config);
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
        };
        let store = AmazonS3Builder::new()
            .with_client_options(client)
            .with_endpoint(&config.endpoint)
            .with_virtual_hosted_style_request(false)
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_retry(retry)
            .build()
            .map_err(|e| {
                refuse(format!(
                    "S3 bucket {} at {}: {e}",
                    config.bucket, config.endpoint
                ))
            })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tiandi-s3")
            .enable_all()
            .build()
            .map_err(BackupError::Io)?;
        Ok(S3Backend {
            store,
            rt,
            endpoint: config.endpoint.clone(),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
        })
    }

    fn key(&self, name: &str) -> Result<Key, BackupError> {
        check_name(name)?;
        let full = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        };
        Key::parse(&full).map_err(|e| self.error(&full, e.into()))
    }

    fn error(&self, key: &str, e: object_store::Error) -> BackupError {
        let kind = match e {
            object_store::Error::NotFound { .. } => std::io::ErrorKind::NotFound,
            object_store::Error::InvalidPath { .. } => std::io::ErrorKind::InvalidInput,
            _ => std::io::ErrorKind::Other,
        };
        BackupError::Io(std::io::Error::new(
            kind,
            format!(
                "S3 bucket {} at {}, key {key:?}: {e}",
                self.bucket, self.endpoint
            ),
        ))
    }

    /// Runs one call to completion on the backend's runtime.
    fn run<T>(
        &self,
        key: &Key,
        f: impl Future<Output = Result<T, object_store::Error>>,
    ) -> Result<T, BackupError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(BackupError::Io(std::io::Error::other(format!(
                "S3 bucket {} at {}: called from inside a tokio runtime (call it from \
                 spawn_blocking or a plain thread)",
                self.bucket, self.endpoint
            ))));
        }
        self.rt.block_on(f).map_err(|e| self.error(key.as_ref(), e))
    }
}

impl Backend for S3Backend {
    fn read(&self, name: &str) -> Result<Vec<u8>, BackupError> {
        let key = self.key(name)?;
        let got = self.run(&key, async {
            let g = self.store.get_opts(&key, GetOptions::default()).await?;
            if g.meta.size > MAX_WHOLE {
                return Ok(None);
            }
            g.bytes().await.map(Some)
        })?;
        match got {
            Some(b) => Ok(Vec::from(b)),
            None => Err(BackupError::BadPack(format!(
                "{}: {key} is too large",
                self.describe()
            ))),
        }
    }

    fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackupError> {
        let key = self.key(name)?;
        let end = offset.checked_add(len).filter(|_| len <= MAX_WHOLE);
        let Some(end) = end else {
            return Err(BackupError::BadPack(format!(
                "{}: {key}: a read of {len} bytes from {offset}",
                self.describe()
            )));
        };
        if len == 0 {
            self.run(&key, self.store.head(&key))?;
            return Ok(Vec::new());
        }
        let b = self.run(&key, self.store.get_range(&key, offset..end))?;
        if b.len() as u64 != len {
            return Err(BackupError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "S3 bucket {} at {}, key {key:?}: asked for {len} bytes from {offset}, got {}",
                    self.bucket,
                    self.endpoint,
                    b.len()
                ),
            )));
        }
        Ok(Vec::from(b))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        let key = self.key(name)?;
        let payload = PutPayload::from(bytes.to_vec());
        self.run(&key, self.store.put(&key, payload)).map(|_| ())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        let key = self.key(prefix)?;
        let metas: Vec<_> = self.run(&key, self.store.list(Some(&key)).try_collect())?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.as_ref().strip_prefix(&strip)?;
                check_name(name).ok()?;
                Some((name.to_string(), m.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn remove(&self, name: &str) -> Result<(), BackupError> {
        let key = self.key(name)?;
        match self.run(&key, self.store.delete(&key)) {
            Err(BackupError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn is_empty(&self) -> Result<bool, BackupError> {
        let key = Key::from_iter(self.prefix.split('/').filter(|p| !p.is_empty()));
        let first = self.run(&key, async {
            let prefix = (!self.prefix.is_empty()).then_some(&key);
            self.store.list(prefix).try_next().await
        })?;
        Ok(first.is_none())
    }

    fn describe(&self) -> String {
        let mut d = format!("s3:{}/{}", self.endpoint, self.bucket);
        if !self.prefix.is_empty() {
            d.push('/');
            d.push_str(&self.prefix);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(s: &str) -> Result<S3Config, BackupError> {
        S3Config::from_location(s, "AKID", "not-shown-anywhere")
    }

    #[test]
    fn locations() {
        let c = loc("s3:https://s3.example.cn:9000/ops-backup/beijing/db").unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.bucket.as_str(), c.prefix.as_str()),
            ("https://s3.example.cn:9000", "ops-backup", "beijing/db")
        );
        assert_eq!(c.region, DEFAULT_REGION);
        let c = loc("s3:http://127.0.0.1:9000/ops-backup/").unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("ops-backup", ""));
        loc("s3:http://localhost:9000/ops-backup/x").unwrap();
        loc("s3:http://127.9.8.7/ops-backup").unwrap();
        loc("s3:http://[::1]:9000/ops-backup").unwrap();
        for (bad, says) in [
            ("s3:http://10.0.0.5:9000/ops-backup", "loopback"),
            ("s3:http://s3.example.cn/ops-backup", "loopback"),
            ("s3:http://127.0.0.1.example.cn/ops-backup", "loopback"),
            ("s3:ftp://127.0.0.1/ops-backup", "not https"),
            ("s3:https://s3.example.cn/", "no bucket"),
            ("s3:https://s3.example.cn/Ops_Backup", "S3 bucket"),
            ("s3:https://s3.example.cn/ops-backup/a/../b", ". and .."),
            ("s3:https://s3.example.cn/ops-backup/%2e%2e/b", ". and .."),
            ("s3:https://s3.example.cn/ops-backup/.hidden", "S3 prefix"),
            ("s3:https://s3.example.cn/ops-backup/a//b", "S3 prefix"),
            ("s3:https://u:p@s3.example.cn/ops-backup", "credentials"),
            ("s3:https://s3.example.cn/ops-backup?x=1", "query"),
            ("s3:not a url", "s3:https://host"),
        ] {
            let e = loc(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = S3Config::from_location("s3:https://s3.example.cn/ops-backup", "AKID", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret access key is empty"), "{e}");
        assert!(S3Config::from_location("s3:https://s3.example.cn/ops-backup", "", "x").is_err());
    }

    #[test]
    fn the_secret_is_never_shown() {
        let c = loc("s3:https://s3.example.cn/ops-backup").unwrap();
        assert!(!format!("{c:?}").contains("not-shown-anywhere"));
        let e = credentials_from_toml(
            "access_key_id = \"AKID\"\nsecret_access_key = not-shown-anywhere\n",
            "creds",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("creds") && e.contains("line 2"), "{e}");
        assert!(!e.contains("not-shown-anywhere"), "{e}");
        assert_eq!(
            credentials_from_toml("access_key_id = \"a\"\nsecret_access_key = \"b\"\n", "c")
                .unwrap(),
            ("a".to_string(), "b".to_string())
        );
        assert!(credentials_from_toml("access_key_id = \"a\"\n", "c").is_err());
        assert!(
            credentials_from_toml("access_key_id = \"a\"\nsecret_access_key = \"\"\n", "c")
                .is_err()
        );
    }

    #[test]
    fn keys_and_a_call_from_inside_a_runtime() {
        let c = loc("s3:http://127.0.0.1:9/ops-backup/site-a").unwrap();
        let be = S3Backend::new(&c).unwrap();
        assert_eq!(be.describe(), "s3:http://127.0.0.1:9/ops-backup/site-a");
        assert_eq!(
            be.key("packs/ab/abcd").unwrap().as_ref(),
            "site-a/packs/ab/abcd"
        );
        assert!(be.key("../x").is_err());
        // Refused with an error, not a panic, and without sending anything.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt.block_on(async { be.read("config") }).unwrap_err();
        assert!(e.to_string().contains("inside a tokio runtime"), "{e}");
        drop(rt);
        let root = S3Backend::new(&loc("s3:http://127.0.0.1:9/ops-backup").unwrap()).unwrap();
        assert_eq!(root.key("config").unwrap().as_ref(), "config");
    }

    /// Counts the connections to a listener on 127.0.0.1, answering each request with a 404.
    fn counting_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{BufRead, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut r = std::io::BufReader::new(c);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = r.get_mut().write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        (port, hits)
    }

    /// With the proxy variables set (and NO_PROXY not), a loopback endpoint is still asked
    /// directly. The variables are set for a child process running this test, not in this one.
    #[test]
    fn a_loopback_endpoint_is_asked_directly_whatever_the_proxy_variables_say() {
        const CHILD: &str = "TIANDI_S3_PROXY_TEST_ENDPOINT";
        if let Some(endpoint) = std::env::var_os(CHILD) {
            let c = loc(&format!("s3:{}/ops-backup", endpoint.to_str().unwrap())).unwrap();
            let e = S3Backend::new(&c).unwrap().read("config").unwrap_err();
            assert!(e.to_string().contains("ops-backup"), "{e}");
            return;
        }
        let (server, server_hits) = counting_server();
        let (proxy, proxy_hits) = counting_server();
        let proxy_url = format!("http://127.0.0.1:{proxy}");
        for endpoint in [
            format!("http://127.0.0.1:{server}"),
            format!("http://localhost:{server}"),
        ] {
            // This very binary, even if a build has replaced its file since it started.
            let out = std::process::Command::new("/proc/self/exe")
                .args([
                    "--exact",
                    "s3::tests::a_loopback_endpoint_is_asked_directly_whatever_the_proxy_variables_say",
                    "--test-threads=1",
                ])
                .env(CHILD, &endpoint)
                .env("HTTP_PROXY", &proxy_url)
                .env("HTTPS_PROXY", &proxy_url)
                .env("ALL_PROXY", &proxy_url)
                .env("http_proxy", &proxy_url)
                .env_remove("NO_PROXY")
                .env_remove("no_proxy")
                .output()
                .unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "{endpoint}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(proxy_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(server_hits.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }
}
