//! Real `redis-server` processes for the shared-tier tests: each on a free loopback port
//! with its own temporary directory, no persistence, killed when dropped; and a
//! three-master Redis Cluster made of them. `.ci/run` installs `redis-server` (Debian's
//! package, which brings `redis-cli`) when it is missing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that nothing listens on now, whose cluster bus port (+10000) is
/// free too. Another process could take it before the server binds: the server would
/// then fail to start, and [`Redis::start`] reports it.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Polls `ok` every 50 ms until it holds or `limit` passes; whether it held.
pub fn eventually(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ok()
}

/// One `redis-server` process.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    cluster: bool,
    /// TLS only (no plain port), with a self-signed certificate for 127.0.0.1 in `dir`.
    tls: bool,
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `redis-cli -p PORT ARGS…`: its stdout, trimmed.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli is installed (.ci/run installs the redis-server package)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Redis {
    /// A standalone server.
    pub fn start() -> Self {
        Self::spawn(false, false)
    }

    /// A standalone server speaking TLS only, with a certificate for 127.0.0.1 signed by
    /// a CA made by `openssl` ([`cert`](Self::cert) is what a client must trust).
    pub fn start_tls() -> Self {
        Self::spawn(false, true)
    }

    fn spawn(cluster: bool, tls: bool) -> Self {
        let mut r = Self {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            cluster,
            tls,
        };
        if tls {
            // A CA and a server certificate it signed (webpki refuses a CA certificate
            // used as the server's own).
            let steps: [&[&str]; 3] = [
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-subj",
                    "/CN=dcache test CA",
                ],
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    "key.pem",
                    "-out",
                    "req.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
                &[
                    "x509",
                    "-req",
                    "-in",
                    "req.csr",
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    "cert.pem",
                    "-days",
                    "2",
                    "-extfile",
                    "ext",
                ],
            ];
            std::fs::write(r.dir.path().join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
            for step in steps {
                let made = Command::new("openssl")
                    .args(step)
                    .current_dir(r.dir.path())
                    .stdin(Stdio::null())
                    .output()
                    .expect("openssl is installed");
                assert!(
                    made.status.success(),
                    "{}",
                    String::from_utf8_lossy(&made.stderr)
                );
            }
        }
        r.restart();
        r
    }

    /// The CA that signed a TLS server's certificate: what a client must trust.
    pub fn cert(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Starts the server again on the same port and directory (it comes back empty).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("redis-server");
        let port = self.port.to_string();
        if self.tls {
            cmd.args(["--bind", "127.0.0.1", "--port", "0", "--tls-port", &port])
                .args(["--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem"])
                .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
                .current_dir(self.dir.path());
        } else {
            cmd.args(["--bind", "127.0.0.1", "--port", &port]);
        }
        cmd.arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no"])
            // DEBUG SLEEP plays a slow server; only from loopback.
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]);
        }
        self.child = Some(
            cmd.spawn()
                .expect("redis-server is installed (.ci/run installs it)"),
        );
        assert!(
            eventually(Duration::from_secs(30), || self.cli(&["PING"]) == "PONG"),
            "redis-server on port {} did not come up",
            self.port
        );
    }

    /// Kills the server (SIGKILL: an outage, not a shutdown) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        if self.tls {
            let cert = self.cert();
            let tls = ["--tls", "--cacert", cert.to_str().unwrap()];
            return cli(self.port, &[&tls[..], args].concat());
        }
        cli(self.port, args)
    }

    /// The keys stored here under the dcache prefix.
    pub fn keys(&self) -> Vec<String> {
        let out = self.cli(&["--scan", "--pattern", "dcache:*"]);
        out.lines().map(str::to_owned).collect()
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A Redis Cluster of three masters and no replicas.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    /// Starts three cluster-enabled servers and joins them with `redis-cli --cluster
    /// create`; returns once every node reports the cluster ok.
    pub fn start() -> Self {
        let nodes: Vec<Redis> = (0..3).map(|_| Redis::spawn(true, false)).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            assert!(
                eventually(Duration::from_secs(60), || n
                    .cli(&["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")),
                "cluster node {} never became ok",
                n.port
            );
        }
        Self { nodes }
    }

    /// `redis+cluster://` with the first two nodes as seeds (the third is discovered).
    pub fn url(&self) -> String {
        format!(
            "redis+cluster://127.0.0.1:{},127.0.0.1:{}",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    /// How many dcache keys each node holds.
    pub fn keys_per_node(&self) -> Vec<usize> {
        self.nodes.iter().map(|n| n.keys().len()).collect()
    }
}
