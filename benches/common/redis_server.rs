//! A `redis-server` of the benchmark's own, on a free loopback port, without persistence.
//!
//! It runs under a small `sh` watchdog that reads the benchmark's pipe: however the benchmark
//! ends (even killed), the pipe closes and the watchdog stops the server. Dropping the
//! handle stops it at once. (A small copy of the tests' helper, so the benchmarks do not
//! depend on test files.)

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use tower_idempotency::RedisStore;

/// A running `redis-server`, stopped on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    watchdog: Child,
    stdin: Option<ChildStdin>,
}

impl RedisServer {
    /// Starts a server on a free loopback port, or says why it could not.
    pub fn start() -> Result<Self, String> {
        let mut last_error = String::from("no attempt");
        // A port found free may be taken before the server binds it: try a few.
        for attempt in 0..5 {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|listener| listener.local_addr())
                .map_err(|error| format!("finding a free port: {error}"))?
                .port();
            let dir = std::env::temp_dir().join(format!(
                "tower-idempotency-bench-redis-{}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
            match Self::try_start(port, dir.clone()) {
                Ok(server) => return Ok(server),
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    last_error = error;
                }
            }
        }
        Err(last_error)
    }

    fn try_start(port: u16, dir: PathBuf) -> Result<Self, String> {
        let script = r#"redis-server "$@" </dev/null >/dev/null 2>&1 &
pid=$!
read _
kill "$pid" 2>/dev/null
wait "$pid""#;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--logfile", "redis.log", "--dir"])
            .arg(&dir)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("spawning sh: {error}"))?;
        let stdin = watchdog.stdin.take();
        let server = Self {
            port,
            dir,
            watchdog,
            stdin,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(port) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "redis-server gave no PONG on port {port} within 10 s"
        ))
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many times each command ran, from `INFO commandstats` (leaving out `INFO`).
    pub fn command_counts(&self) -> BTreeMap<String, u64> {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["INFO", "commandstats"])
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.trim().parse().ok()?))
            })
            .filter(|(name, _)| name != "info")
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.watchdog.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

/// A `redis-server` of our own and a `RedisStore` on it; `None` (with a note on standard
/// error) if there is no `redis-server` to run.
pub fn with_store(runtime: &tokio::runtime::Runtime) -> Option<(RedisServer, RedisStore)> {
    let server = match RedisServer::start() {
        Ok(server) => server,
        Err(error) => {
            eprintln!("skipping the Redis measurements: {error}");
            return None;
        }
    };
    match runtime.block_on(RedisStore::connect(&server.url())) {
        Ok(store) => Some((server, store)),
        Err(error) => {
            eprintln!("skipping the Redis measurements: {error}");
            None
        }
    }
}
