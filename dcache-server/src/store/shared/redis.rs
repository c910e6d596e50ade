//! The shared tier's [`Backend`] on Redis: one server (`redis://`, `rediss://` over
//! rustls, `redis+unix://`) or a Redis Cluster (`redis+cluster://H1:P1,H2:P2,…`, or
//! `rediss+cluster://`), with the `redis` crate's async, multiplexed connections.
//!
//! The connection is made on first use, not at start, so a server starts and serves
//! while Redis is down. A connection that breaks is dropped and made again by the next
//! operation, at most once a second (an outage costs each lookup one refused attempt
//! rather than a connect timeout).

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, Pipeline, RedisError};
use tokio::time::Instant;

use super::{Backend, BackendError};
use crate::lock;

/// How long after a failed connect the next one is tried.
const RETRY: Duration = Duration::from_secs(1);

/// Why a `--shared` URL was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisUrlError {
    /// The `redis` crate does not take it (scheme, host, port, database).
    #[error("{url}: {source}")]
    Invalid {
        /// The URL with any password removed.
        url: String,
        /// What the crate said.
        source: RedisError,
    },
    /// A cluster URL without any node.
    #[error("{0}: a cluster URL lists its seed nodes: redis+cluster://H1:P1,H2:P2")]
    NoNodes(String),
}

enum Target {
    Single(Client),
    Cluster(ClusterClient),
}

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// One Redis server or one Redis Cluster, as a [`Backend`].
pub struct RedisBackend {
    target: Target,
    /// The URL without credentials, for logs.
    what: String,
    /// Connect and response timeout of the underlying connections.
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
    /// One connect at a time: the others wait for it rather than each dialing.
    connecting: tokio::sync::Mutex<()>,
    /// No connect before this, after one failed.
    retry_after: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

/// `url` with the password (anything between `//` and `@`) removed.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl RedisBackend {
    /// A backend for `url` (not connected yet). `timeout` bounds each connect and each
    /// answer of the underlying connection; callers put their own, shorter, deadline on
    /// lookups.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, RedisUrlError> {
        let what = redact(url);
        let invalid = |source| RedisUrlError::Invalid {
            url: what.clone(),
            source,
        };
        let cluster = [
            ("redis+cluster://", "redis://"),
            ("rediss+cluster://", "rediss://"),
        ]
        .into_iter()
        .find_map(|(scheme, node)| url.strip_prefix(scheme).map(|rest| (rest, node)));
        let target = match cluster {
            Some((rest, node_scheme)) => {
                let (auth, hosts) = match rest.rfind('@') {
                    Some(at) => (&rest[..=at], &rest[at + 1..]),
                    None => ("", rest),
                };
                let nodes: Vec<String> = hosts
                    .trim_end_matches('/')
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(|h| format!("{node_scheme}{auth}{h}"))
                    .collect();
                if nodes.is_empty() {
                    return Err(RedisUrlError::NoNodes(what));
                }
                let client = ClusterClient::builder(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()
                    .map_err(invalid)?;
                Target::Cluster(client)
            }
            None => Target::Single(Client::open(url).map_err(invalid)?),
        };
        Ok(Self {
            target,
            what,
            timeout,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            retry_after: Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        match &self.target {
            Target::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Target::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }

    /// The live connection, made if there is none (and a retry is due).
    async fn conn(&self) -> Result<Conn, BackendError> {
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        if lock(&self.retry_after).is_some_and(|t| Instant::now() < t) {
            return Err(BackendError::Unreachable("reconnecting".into()));
        }
        match self.connect().await {
            Ok(c) => {
                *lock(&self.conn) = Some(c.clone());
                *lock(&self.retry_after) = None;
                Ok(c)
            }
            Err(e) => {
                *lock(&self.retry_after) = Some(Instant::now() + RETRY);
                Err(BackendError::Unreachable(e.to_string()))
            }
        }
    }

    /// Maps a command's error, dropping the connection when it is the connection that
    /// failed (the next operation makes a new one).
    fn failed(&self, e: RedisError) -> BackendError {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            *lock(&self.conn) = None;
            BackendError::Unreachable(e.to_string())
        } else {
            BackendError::Refused(e.to_string())
        }
    }

    async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, BackendError> {
        let r = match self.conn().await? {
            Conn::Single(mut c) => cmd.query_async(&mut c).await,
            Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
        };
        r.map_err(|e| self.failed(e))
    }

    async fn pipe(&self, pipe: &Pipeline) -> Result<(), BackendError> {
        let r: Result<(), RedisError> = match self.conn().await? {
            Conn::Single(mut c) => pipe.query_async(&mut c).await,
            Conn::Cluster(mut c) => pipe.query_async(&mut c).await,
        };
        r.map_err(|e| self.failed(e))
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait::async_trait]
impl Backend for RedisBackend {
    fn describe(&self) -> String {
        self.what.clone()
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, BackendError> {
        self.cmd(redis::cmd("GET").arg(name)).await
    }

    async fn get_many(&self, names: &[String]) -> Result<Vec<Option<Bytes>>, BackendError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Bytes>> = self.cmd(redis::cmd("MGET").arg(names)).await?;
        if values.len() != names.len() {
            return Err(BackendError::Refused(format!(
                "MGET of {} names answered {} values",
                names.len(),
                values.len()
            )));
        }
        Ok(values)
    }

    async fn put_many(
        &self,
        values: &[(String, Bytes)],
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let mut pipe = redis::pipe();
        for (name, value) in values {
            pipe.cmd("SET")
                .arg(name)
                .arg(value.as_ref())
                .arg("PX")
                .arg(millis(ttl))
                .ignore();
        }
        self.pipe(&pipe).await
    }

    async fn touch(&self, names: &[String], ttl: Duration) -> Result<(), BackendError> {
        let mut pipe = redis::pipe();
        for name in names {
            pipe.cmd("PEXPIRE").arg(name).arg(millis(ttl)).ignore();
        }
        self.pipe(&pipe).await
    }

    async fn delete(&self, names: &[String]) -> Result<(), BackendError> {
        let mut pipe = redis::pipe();
        for name in names {
            pipe.cmd("DEL").arg(name).ignore();
        }
        self.pipe(&pipe).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_parse_and_logs_never_show_a_password() {
        let t = Duration::from_secs(1);
        let b = RedisBackend::new("redis://:hunter2@127.0.0.1:6379/2", t).unwrap();
        assert!(!b.describe().contains("hunter2"), "{}", b.describe());
        assert!(matches!(
            RedisBackend::new("redis+cluster://127.0.0.1:1,127.0.0.1:2", t)
                .unwrap()
                .target,
            Target::Cluster(_)
        ));
        assert!(matches!(
            RedisBackend::new("redis+cluster://", t),
            Err(RedisUrlError::NoNodes(_))
        ));
        assert!(RedisBackend::new("redis+unix:///tmp/redis.sock", t).is_ok());
        assert!(RedisBackend::new("rediss://127.0.0.1:6380", t).is_ok());
        assert!(RedisBackend::new("http://127.0.0.1", t).is_err());
        let e = RedisBackend::new("redis+cluster://u:secret@h:1,h:2", t).unwrap();
        assert!(!e.describe().contains("secret"));
    }
}
