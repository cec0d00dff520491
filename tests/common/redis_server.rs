//! Real `redis-server` processes for the Redis tests: started on free loopback ports (outside
//! the ephemeral range, see [`free_port`]) in a temporary directory, without persistence, and
//! stopped when dropped.
//!
//! Each server runs under a small `sh` watchdog that reads its standard input: when the test
//! process ends in any way (even killed, or a server kept in a `static` that is never
//! dropped), the pipe closes and the watchdog stops the server. No server outlives its tests.
//!
//! The benchmarks include this file too (`#[path]`), so it depends on nothing else.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

const INSTALL: &str = "the Redis tests need `redis-server` and `redis-cli` on PATH: \
                       install Debian's `redis-server` package (`apt-get install redis-server`)";

/// How long a server may take to answer its first PING.
const STARTUP: Duration = Duration::from_secs(10);

/// Fails the test, with how to fix it, unless `redis-server` and `redis-cli` are installed.
pub fn require_redis() {
    if let Err(tool) = installed() {
        panic!("`{tool}` was not found: {INSTALL}");
    }
}

/// `Ok` if `redis-server` and `redis-cli` run, else the name of the one that does not.
pub fn installed() -> Result<(), &'static str> {
    for tool in ["redis-server", "redis-cli"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            return Err(tool);
        }
    }
    Ok(())
}

/// A free TCP port on the loopback interface, outside the kernel's ephemeral port range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), and never handed out before by this process.
///
/// The one place the tests choose a port (the shell scripts' twin is `scripts/lib/ports.sh`).
/// Linux gives ports in the ephemeral range to outgoing connections as their source port, so
/// a port found free there (binding port 0 picks one) can be taken by any connection before a
/// server binds it, or while a server is down between a `stop` and its `restart` on the same
/// port. Outside the range only a program that binds that very port can take it.
pub fn free_port() -> u16 {
    use std::{
        collections::HashSet,
        hash::{BuildHasher, RandomState},
        sync::Mutex,
    };
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (low, high) = ephemeral_range();
    // 10000..low and high+1..=65535: whichever exist.
    let below = u32::from(low.saturating_sub(10_000));
    let above = u32::from(u16::MAX.saturating_sub(high));
    assert!(
        below + above > 0,
        "no port outside the ephemeral range {low}-{high}"
    );
    let seed = RandomState::new();
    for attempt in 0..1_000u32 {
        let draw =
            u32::try_from(seed.hash_one((std::process::id(), attempt)) % u64::from(below + above))
                .expect("below 65536");
        let port = if draw < below {
            10_000 + draw
        } else {
            u32::from(high) + 1 + draw - below
        };
        let port = u16::try_from(port).expect("at most 65535");
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let given = given.get_or_insert_with(HashSet::new);
        if given.contains(&port) || TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
            continue;
        }
        given.insert(port);
        return port;
    }
    panic!("no free loopback port outside the ephemeral range {low}-{high}");
}

/// The kernel's ephemeral port range: Linux's default when it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let parsed = range.as_deref().and_then(|range| {
        let mut bounds = range.split_whitespace().map(str::parse::<u16>);
        match (bounds.next(), bounds.next()) {
            (Some(Ok(low)), Some(Ok(high))) if low <= high => Some((low, high)),
            _ => None,
        }
    });
    parsed.unwrap_or((32_768, 60_999))
}

/// A new temporary directory for one test server: `tower-idempotency-{what}-{pid}-{n}`.
pub fn temp_dir(what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tower-idempotency-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// One `redis-server` process.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    running: Option<Running>,
}

struct Running {
    watchdog: Child,
    stdin: ChildStdin,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server on a free port with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        require_redis();
        let dir = temp_dir("redis");
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        // A port found free may be taken before the server binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                dir: dir.clone(),
                extra: extra.clone(),
                running: None,
            };
            match server.try_start() {
                Ok(()) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// The port it listens on (the same across `stop`/`restart`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The directory it runs in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server (its clients see their connections closed). Bounded: a server that
    /// does not exit within 10 s fails the test.
    pub fn stop(&mut self) {
        let Some(Running {
            mut watchdog,
            stdin,
        }) = self.running.take()
        else {
            return;
        };
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match watchdog.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = watchdog.kill();
                    let _ = watchdog.wait();
                    panic!("redis-server on port {} did not stop", self.port);
                }
            }
        }
        // The port is free again once nothing accepts on it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "port {} still accepts",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same port, empty (nothing is persisted).
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "the server is running");
        if let Err(error) = self.try_start() {
            panic!(
                "redis-server did not restart on port {}: {error}",
                self.port
            );
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
            "--dir",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(self.dir.display().to_string());
        args.extend(self.extra.iter().cloned());
        // `read` returns when the test process closes the pipe, however it ends.
        let script = r#"redis-server "$@" </dev/null >/dev/null 2>&1 &
pid=$!
read _
kill "$pid" 2>/dev/null
wait "$pid""#;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&args)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("spawning sh: {error}"))?;
        let stdin = watchdog.stdin.take().ok_or("no stdin")?;
        let running = Running { watchdog, stdin };
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if ping(self.port) {
                self.running = Some(running);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Running {
            mut watchdog,
            stdin,
        } = running;
        drop(stdin);
        let _ = watchdog.kill();
        let _ = watchdog.wait();
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        Err(format!(
            "no PONG on port {} within {STARTUP:?}; log:\n{log}",
            self.port
        ))
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(Running {
            mut watchdog,
            stdin,
        }) = self.running.take()
        {
            drop(stdin);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(watchdog.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a server answers PING on `port` within a short bound.
fn ping(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// Runs `redis-cli -p {port} {args}`, bounded by 30 s, and returns its standard output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("running redis-cli: {error}; {INSTALL}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-cli {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("redis-cli output");
    assert!(
        output.status.success(),
        "redis-cli {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// How many commands the server ran since its statistics were last reset, by name, from
/// `INFO commandstats` — leaving out the `INFO` and `CONFIG` calls that measure it.
pub fn command_counts(server_port: u16) -> std::collections::BTreeMap<String, u64> {
    let info = cli(server_port, &["INFO", "commandstats"]);
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.trim().parse().ok()?))
        })
        .filter(|(name, _)| name != "info" && !name.starts_with("config"))
        .collect()
}

/// A Redis Cluster of `masters` primaries and no replicas, each a `RedisServer`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits (bounded) until every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
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
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        cli(nodes[0].port(), &create);
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            loop {
                let info = node.cli(&["CLUSTER", "INFO"]);
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not become ok:\n{info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// The URLs of its nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Its nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}
