//! Real PostgreSQL servers for the Postgres tests: `initdb` into a temporary directory, the
//! server on a free loopback port outside the kernel's ephemeral range, stopped when dropped.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then the server runs as the
//! `postgres` system user that Debian's package creates (`runuser -u postgres --`), and the
//! temporary directory is handed to it.
//!
//! Each server runs under a small `sh` watchdog that reads its standard input: when the test
//! process ends in any way (even killed), the pipe closes and the watchdog stops the server
//! (`pg_ctl stop -m immediate`) and removes its directory. No server outlives its tests.
//!
//! `kill` SIGKILLs the postmaster and its backends (a crash: nothing is shut down cleanly);
//! `restart` starts the server again on the same port and data directory, which then recovers
//! from its write-ahead log as after a power cut.

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

const INSTALL: &str = "the Postgres tests need PostgreSQL's server binaries (`initdb`, `pg_ctl`, \
                       `postgres`, found in /usr/lib/postgresql/<version>/bin or on PATH): \
                       install Debian's postgresql package (`apt-get install postgresql`)";

/// How long a server may take to accept connections.
const STARTUP: Duration = Duration::from_secs(30);

/// The directory holding `initdb`, `pg_ctl` and `postgres`: the newest
/// `/usr/lib/postgresql/<version>/bin`, else the directory of `pg_ctl` on PATH. Fails the test
/// with how to install them when there is none.
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("pg_ctl").exists() && dir.join("initdb").exists())
    });
    on_path.unwrap_or_else(|| panic!("`initdb` and `pg_ctl` were not found: {INSTALL}"))
}

/// A loopback port that is free now and outside the kernel's ephemeral range: the tests'
/// one port picker ([`free_port`](super::redis_server::free_port)).
pub fn free_port() -> u16 {
    super::redis_server::free_port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// One PostgreSQL server with a database `postgres` that the user `postgres` reaches without
/// a password over TCP.
pub struct PostgresServer {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    running: Option<Running>,
}

struct Running {
    watchdog: Child,
    stdin: ChildStdin,
}

impl PostgresServer {
    /// Creates a cluster in a temporary directory and starts it on a free port, with
    /// `pg_stat_statements` loaded (to count the statements each operation costs).
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = super::redis_server::temp_dir("pg");
        let as_postgres = is_root();
        let mut server = Self {
            port: 0,
            dir,
            bin,
            as_postgres,
            running: None,
        };
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&server.dir)
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "chown the temporary directory to postgres"
            );
        }
        server.initdb();
        // A port found free may be taken before the server binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.try_start() {
                Ok(()) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("postgres did not start: {last_error}");
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn initdb(&self) {
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(self.data())
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("running initdb: {error}; {INSTALL}"));
        assert!(
            output.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The port it listens on (the same across `kill`/`restart`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The directory it runs in (the cluster is in `data/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn try_start(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(self.data().join("postmaster.pid"));
        let port = self.port.to_string();
        let postgres = self.bin.join("postgres");
        let pg_ctl = self.bin.join("pg_ctl");
        let (runner, stop): (&str, String) = if self.as_postgres {
            ("runuser -u postgres --", "runuser -u postgres --".into())
        } else {
            ("", String::new())
        };
        let logged = self.log().len();
        // `read` returns when the test process closes the pipe, however it ends.
        let script = format!(
            r#"{runner} "$0" -D "$1" -p "$2" -h 127.0.0.1 -k "$3" -c fsync=off \
  -c full_page_writes=off -c max_connections=300 \
  -c shared_preload_libraries=pg_stat_statements -c log_min_messages=warning \
  </dev/null >>"$3/postgres.log" 2>&1 &
pid=$!
read keep
# Until the server is gone: a postmaster that has not written its pid file yet is asked again.
while kill -0 "$pid" 2>/dev/null; do
  {stop} "$4" stop -D "$1" -m immediate -w -t 10 >/dev/null 2>&1 || sleep 0.1
done
wait
# The test process ended (a server kept in a `static` is never dropped): nothing is left.
[ "$keep" = keep ] || rm -rf "$3""#
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(postgres)
            .arg(self.data())
            .arg(&port)
            .arg(&self.dir)
            .arg(pg_ctl)
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
            if self.ready() {
                self.running = Some(running);
                return Ok(());
            }
            // Only what this start logged (an earlier crash leaves FATAL lines behind), and
            // not a client turned away while the server recovers ("the database system is
            // not yet accepting connections"): the server's own failure.
            let failed = self.log().get(logged..).is_some_and(|log| {
                log.lines()
                    .any(|line| line.contains("FATAL") && !line.contains("the database system is"))
            });
            if failed {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Running {
            mut watchdog,
            stdin,
        } = running;
        drop(stdin);
        wait_bounded(&mut watchdog, "the watchdog of a server that did not start");
        let log = self.log().get(logged..).unwrap_or_default().to_owned();
        Err(format!(
            "not ready on port {} within {STARTUP:?}; log:\n{log}",
            self.port
        ))
    }

    /// Whether the postmaster says it is ready (`postmaster.pid`'s status line) and accepts
    /// TCP connections.
    fn ready(&self) -> bool {
        let pid_file =
            std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap_or_default();
        pid_file
            .lines()
            .nth(7)
            .is_some_and(|status| status.trim() == "ready")
            && TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
    }

    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// What the server logged (warnings and worse).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server cleanly (its clients see their connections closed).
    pub fn stop(&mut self) {
        let Some(Running {
            mut watchdog,
            stdin,
        }) = self.running.take()
        else {
            return;
        };
        keep(stdin);
        wait_bounded(&mut watchdog, "the watchdog");
        self.wait_port_closed();
    }

    /// SIGKILLs the postmaster and every backend it started: a crash, nothing shut down.
    pub fn kill(&mut self) {
        let Some(Running {
            mut watchdog,
            stdin,
        }) = self.running.take()
        else {
            return;
        };
        assert!(self.kill_postmaster(), "postgres survived SIGKILL");
        keep(stdin);
        wait_bounded(&mut watchdog, "the watchdog");
        self.wait_port_closed();
    }

    /// SIGKILLs the postmaster and its backends; whether they are gone within 10 s.
    fn kill_postmaster(&self) -> bool {
        let Some(pid) = self.postmaster_pid() else {
            return true;
        };
        let mut victims = vec![pid];
        victims.extend(children_of(pid));
        for victim in &victims {
            let _ = Command::new("kill")
                .args(["-9", &victim.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while victims
            .iter()
            .any(|victim| Path::new(&format!("/proc/{victim}")).exists() && !zombie(*victim))
        {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "the server is running");
        if let Err(error) = self.try_start() {
            panic!("postgres did not restart on port {}: {error}", self.port);
        }
    }

    fn wait_port_closed(&self) {
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
}

/// Tells the watchdog to stop the server and keep its directory (for a restart).
fn keep(mut stdin: ChildStdin) {
    use std::io::Write;
    let _ = stdin.write_all(b"keep\n");
}

fn wait_bounded(child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not stop");
            }
        }
    }
}

/// The processes whose parent is `pid` (from `/proc/*/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The command name is in parentheses and may hold spaces: read after the last ')'.
            let after = &stat[stat.rfind(')')? + 1..];
            let parent: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (parent == pid).then_some(child)
        })
        .collect()
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .is_some_and(|at| stat[at + 1..].split_whitespace().next() == Some("Z"))
    })
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(Running {
            mut watchdog,
            stdin,
        }) = self.running.take()
        {
            drop(stdin);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(watchdog.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(watchdog.try_wait(), Ok(None)) {
                // The clean stop did not come: no server outlives its test.
                self.kill_postmaster();
                let _ = watchdog.kill();
                let _ = watchdog.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
