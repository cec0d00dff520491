//! Highly available Redis for the failover tests, started by the tests on loopback: a primary
//! with a replica, three Sentinels watching it, a Redis Cluster with a replica per master.
//!
//! Ports are picked below the ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), so
//! that no outgoing connection of another test takes a port between its check and the
//! server's bind. Each process runs under the same kind of `sh` watchdog as
//! `redis_server.rs`'s (it stops the process when the test process ends, however it ends),
//! which also reports the process id, so that a test can SIGKILL a server as a crash would.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpListener},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use super::redis_server::{cli, require_redis};

const INSTALL_SENTINEL: &str = "the Sentinel tests run `redis-server --sentinel`: install Debian's \
                                `redis-server` package (`apt-get install redis-server`; the \
                                `redis-sentinel` package is the same binary)";

/// The name the Sentinels know the primary by.
pub const SERVICE: &str = "mymaster";

/// A free loopback port outside the ephemeral range: the tests' one port picker.
pub fn ha_port() -> u16 {
    super::redis_server::free_port()
}

/// One `redis-server` process (a data node or a Sentinel).
pub struct Node {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    running: Option<(Child, ChildStdin, u32)>,
}

impl Node {
    /// A data node without persistence, syncing a replica without delay, with extra
    /// `redis-server` arguments.
    pub fn server(extra: &[&str]) -> Self {
        require_redis();
        let mut last = String::new();
        for _ in 0..5 {
            let port = ha_port();
            let dir = super::redis_server::temp_dir("ha-node");
            let mut args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // A replica (re)joining syncs at once, not 5 s later (the default delay waits
                // for more replicas to share one transfer): a failover scenario stays short.
                "--repl-diskless-sync-delay",
                "0",
                "--logfile",
                "redis.log",
                "--dir",
                &dir.display().to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            match Self::spawn(port, dir, &args) {
                Ok(node) => return node,
                Err(error) => last = error,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// A replica of the primary on `primary_port`, once its link is up.
    pub fn replica_of(primary_port: u16, extra: &[&str]) -> Self {
        let primary_port = primary_port.to_string();
        let mut args = vec!["--replicaof", "127.0.0.1", &primary_port];
        args.extend(extra);
        let replica = Self::server(&args);
        replica.await_link();
        replica
    }

    /// A Sentinel watching the primary on `primary_port` as [`SERVICE`] (quorum 2), that
    /// judges it down after `down_after`.
    pub fn sentinel(primary_port: u16, down_after: Duration) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let port = ha_port();
            let dir = super::redis_server::temp_dir("ha-sentinel");
            let config = dir.join("sentinel.conf");
            let written = std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\nlogfile sentinel.log\n\
                     dir {dir}\n\
                     sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {SERVICE} {down}\n\
                     sentinel failover-timeout {SERVICE} 3000\n\
                     sentinel parallel-syncs {SERVICE} 1\n",
                    dir = dir.display(),
                    down = down_after.as_millis(),
                ),
            );
            written.expect("write sentinel.conf");
            let args = [config.display().to_string(), "--sentinel".to_owned()];
            match Self::spawn(port, dir, &args) {
                Ok(node) => return node,
                Err(error) => last = error,
            }
        }
        panic!("redis-server --sentinel did not start: {last}; {INSTALL_SENTINEL}");
    }

    /// Starts it again (after [`kill`](Self::kill) or [`stop`](Self::stop)), on the same
    /// port, with the same arguments and directory, as a supervisor restarting a crashed
    /// process would: without persistence it comes back empty, a primary until Sentinel or
    /// the cluster makes it a replica.
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "the node is running");
        let (port, dir, args) = (self.port, self.dir.clone(), self.args.clone());
        match Self::spawn(port, dir, &args) {
            Ok(mut node) => {
                self.running = node.running.take();
                // The directory is ours: the temporary must not remove it when dropped.
                node.dir = PathBuf::new();
            }
            Err(error) => panic!("redis-server did not restart on port {port}: {error}"),
        }
    }

    /// Starts it again (after [`kill`](Self::kill)) as a careful supervisor restarts a
    /// crashed node that has no persistence: a replica of the primary the Sentinels now name
    /// (`--replicaof`), so it never answers as an empty primary, and with
    /// `replica-priority 0`, so that no Sentinel promotes it while it is still empty (a
    /// second failover to it, before its first sync, would lose every record).
    pub fn restart_as_replica_of(&mut self, primary_port: u16) {
        let primary_port = primary_port.to_string();
        self.args.extend(
            [
                "--replicaof",
                "127.0.0.1",
                &primary_port,
                "--replica-priority",
                "0",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        self.restart();
    }

    fn spawn(port: u16, dir: PathBuf, args: &[String]) -> Result<Self, String> {
        // The watchdog prints the server's pid, then stops it when its standard input closes.
        let script = r#"redis-server "$@" </dev/null >/dev/null 2>&1 &
pid=$!
echo "$pid"
read _
kill "$pid" 2>/dev/null
wait "$pid""#;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("spawning sh: {error}; {INSTALL_SENTINEL}"))?;
        let stdin = watchdog.stdin.take().ok_or("no stdin")?;
        let stdout = watchdog.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|error| format!("reading the pid: {error}"))?;
        let pid: u32 = line
            .trim()
            .parse()
            .map_err(|_| format!("no pid from the watchdog: {line:?}"))?;
        let mut node = Self {
            port,
            dir,
            args: args.to_vec(),
            running: Some((watchdog, stdin, pid)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if node.answers() {
                return Ok(node);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = ["redis.log", "sentinel.log"]
            .iter()
            .filter_map(|file| std::fs::read_to_string(node.dir.join(file)).ok())
            .collect::<String>();
        node.stop();
        Err(format!("no answer on port {port}; log:\n{log}"))
    }

    fn answers(&self) -> bool {
        let mut child = match Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "PING"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(_) => return false,
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        child
            .wait_with_output()
            .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("PONG"))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against it.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// Kills the server with SIGKILL, as a crash would: nothing is flushed or handed over.
    pub fn kill(&mut self) {
        if let Some((_, _, pid)) = &self.running {
            let status = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -KILL {pid}");
        }
        self.stop();
    }

    /// Stops it (SIGTERM through the watchdog), bounded.
    pub fn stop(&mut self) {
        if let Some((mut watchdog, stdin, _)) = self.running.take() {
            drop(stdin);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(watchdog.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// Waits (bounded) until this replica's link to its primary is up.
    pub fn await_link(&self) {
        eventually_sync("the replica's link is up", Duration::from_secs(20), || {
            self.cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        });
    }

    /// What `INFO replication` says of its role: `master` or `slave`.
    pub fn role(&self) -> String {
        self.cli(&["INFO", "replication"])
            .lines()
            .find_map(|line| line.strip_prefix("role:"))
            .unwrap_or("")
            .trim()
            .to_owned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `condition` every 50 ms until it holds, failing the test after `bound`.
pub fn eventually_sync(what: &str, bound: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A primary, one replica, and three Sentinels watching them.
pub struct SentinelGroup {
    pub primary: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
}

impl SentinelGroup {
    /// Starts them and waits (bounded) until every Sentinel knows the replica and the other
    /// two Sentinels, so that a failover can be agreed on.
    pub fn start(down_after: Duration) -> Self {
        let primary = Node::server(&[]);
        let replica = Node::replica_of(primary.port(), &[]);
        let sentinels: Vec<Node> = (0..3)
            .map(|_| Node::sentinel(primary.port(), down_after))
            .collect();
        for sentinel in &sentinels {
            eventually_sync(
                "each Sentinel knows the replica and the other Sentinels",
                Duration::from_secs(30),
                || {
                    let info = sentinel.cli(&["SENTINEL", "MASTER", SERVICE]);
                    let field = |name: &str| {
                        let mut lines = info.lines();
                        while let Some(line) = lines.next() {
                            if line.trim() == name {
                                return lines.next().map(|value| value.trim().to_owned());
                            }
                        }
                        None
                    };
                    field("num-slaves").as_deref() == Some("1")
                        && field("num-other-sentinels").as_deref() == Some("2")
                },
            );
        }
        Self {
            primary,
            replica,
            sentinels,
        }
    }

    /// The Sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Node::url).collect()
    }

    /// Whether every Sentinel names the primary on `port`.
    pub fn all_name_primary(&self, port: u16) -> bool {
        self.sentinels.iter().all(|sentinel| {
            let reply = sentinel.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE]);
            reply
                .lines()
                .nth(1)
                .and_then(|line| line.trim().parse().ok())
                == Some(port)
        })
    }

    /// The port of the primary the first Sentinel names now.
    pub fn primary_port_by_sentinels(&self) -> Option<u16> {
        let reply = self.sentinels[0].cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE]);
        reply.lines().nth(1)?.trim().parse().ok()
    }
}

/// A Redis Cluster of three masters, each with one replica.
pub struct ReplicatedCluster {
    pub nodes: Vec<Node>,
}

impl ReplicatedCluster {
    /// Starts six nodes, creates the cluster (`--cluster-replicas 1`) and waits (bounded)
    /// until every node reports `cluster_state:ok` and every replica's link is up.
    pub fn start(node_timeout: Duration) -> Self {
        let timeout = node_timeout.as_millis().to_string();
        let nodes: Vec<Node> = (0..6)
            .map(|_| {
                let bus = ha_port().to_string();
                Node::server(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
                    "--cluster-port",
                    &bus,
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        nodes[0].cli(&create);
        for node in &nodes {
            eventually_sync("the cluster is ok", Duration::from_secs(30), || {
                node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
            if node.role() == "slave" {
                node.await_link();
            }
        }
        Self { nodes }
    }

    /// The URLs of its nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Adds a fresh, empty node as a replica of `nodes[primary]` (as an operator replaces a
    /// crashed node: a node restarted with its old `nodes.conf` would claim its old slots,
    /// empty, until the cluster tells it otherwise), and waits (bounded) for its link.
    pub fn add_replica_of(&mut self, primary: usize, node_timeout: Duration) {
        let timeout = node_timeout.as_millis().to_string();
        let bus = ha_port().to_string();
        let node = Node::server(&[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &timeout,
            "--cluster-port",
            &bus,
        ]);
        let target = &self.nodes[primary];
        let target_bus = target
            .args
            .iter()
            .skip_while(|arg| *arg != "--cluster-port")
            .nth(1)
            .cloned()
            .expect("the cluster bus port of the primary");
        let id = target.cli(&["CLUSTER", "MYID"]).trim().to_owned();
        node.cli(&[
            "CLUSTER",
            "MEET",
            "127.0.0.1",
            &target.port().to_string(),
            &target_bus,
        ]);
        eventually_sync(
            "the new node knows the primary",
            Duration::from_secs(30),
            || node.cli(&["CLUSTER", "NODES"]).contains(&id),
        );
        eventually_sync("the new node replicates", Duration::from_secs(30), || {
            node.cli(&["CLUSTER", "REPLICATE", &id]).contains("OK")
        });
        node.await_link();
        self.nodes.push(node);
    }
}

/// The version of the installed `redis-server`, as (major, minor).
pub fn server_version() -> (u32, u32) {
    let output = Command::new("redis-server")
        .arg("--version")
        .output()
        .expect("redis-server --version");
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("v="))
        .unwrap_or("0.0");
    let mut parts = version.split('.').map(|part| part.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Writes `line` to `out` (the test's report, printed with `--nocapture`).
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
