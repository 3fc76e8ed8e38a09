//! A throwaway real PostgreSQL server per test: the gateway's database code is tested against
//! the real thing (its SQL, its errors, its crash behaviour), not a mock. Only std is used.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

/// A PostgreSQL server of this test's own, in a temporary directory on a free 127.0.0.1 port;
/// stopped and removed on drop.
pub struct Postgres {
    /// `postgres://nanogate@127.0.0.1:PORT/postgres` (trust auth: no password).
    pub url: String,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

impl Postgres {
    /// initdb (trust auth, user `nanogate`, UTF8, --no-sync) + `pg_ctl start -w`. Settings go
    /// into postgresql.conf rather than `pg_ctl -o`, so that `restart` needs nothing repeated.
    pub fn start() -> Postgres {
        // A fresh machine gets Debian's package the way `.ci/run` installs it, so that `cargo test`
        // alone passes there too.
        let bin = bin_dir()
            .or_else(|| {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-test-deps.sh");
                let installed = Command::new(script).arg("postgres").status();
                assert!(
                    installed.is_ok_and(|s| s.success()),
                    "scripts/install-test-deps.sh postgres failed"
                );
                bin_dir()
            })
            .unwrap_or_else(|| {
                panic!(
                    "PostgreSQL server binaries (initdb, pg_ctl) not found via `pg_config --bindir` \
                     or in /usr/lib/postgresql/*/bin, even after scripts/install-test-deps.sh"
                )
            });
        // initdb refuses to run as root, so as root everything runs as the `postgres` user.
        let as_postgres = stdout(Command::new("id").arg("-u")) == "0";
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let (pid, n) = (std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let nanos = UNIX_EPOCH.elapsed().unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("nanogate-pg-{pid}-{n}-{nanos}"));
        fs::create_dir(&dir).expect("create the PostgreSQL temp dir");
        // 0700: PostgreSQL insists that nobody else can read its data; the owner is whoever runs it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod the temp dir");
        let (data, url) = (dir.join("data"), String::new());
        // From here on a panic drops `pg`, which removes the dir.
        let mut pg = Postgres {
            url,
            dir,
            data,
            port: 0,
            bin,
            as_postgres,
        };
        if as_postgres {
            let chown = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&pg.dir)
                .output();
            check("chown -R postgres", chown, &pg.dir);
        }
        // --no-locale: the C locale exists everywhere (UTF8 is allowed with it); --no-sync: speed.
        let initdb_args = "-U nanogate -A trust -E UTF8 --no-locale --no-sync";
        let initdb = pg.run("initdb", &initdb_args.split(' ').collect::<Vec<_>>());
        check("initdb", initdb, &pg.dir);
        // The socket in our own dir: the system's /var/run/postgresql may not exist or be writable.
        let sockets = pg.dir.display();
        pg.configure(&format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{sockets}'"
        ));
        pg.configure("fsync = off\nshared_buffers = 8MB");
        // Between dropping the probe listener and the server binding, another test may take the
        // port: then try a new one (a later `port =` line overrides the earlier).
        for attempt in 1.. {
            pg.port = free_port();
            pg.configure(&format!("port = {}", pg.port));
            let started = pg.pg_ctl_start();
            if matches!(&started, Ok(o) if o.status.success()) {
                break;
            }
            if attempt == 3 || !log_tail(&pg.dir).contains("Address already in use") {
                check("pg_ctl start", started, &pg.dir);
            }
        }
        pg.url = format!("postgres://nanogate@127.0.0.1:{}/postgres", pg.port);
        pg
    }

    /// `pg_ctl stop -m immediate`: the server exits at once without a shutdown checkpoint, which
    /// clients see as a crash (connections reset, then refused); `restart` runs crash recovery.
    pub fn kill(&self) {
        check("pg_ctl stop -m immediate", self.pg_ctl_stop(), &self.dir);
    }

    /// Starts it again on the same port and data directory; `pg_ctl -w` returns once it accepts
    /// connections (or fails after 30 s).
    pub fn restart(&self) {
        check("pg_ctl start (restart)", self.pg_ctl_start(), &self.dir);
    }

    fn pg_ctl_start(&self) -> std::io::Result<Output> {
        let log = self.dir.join("postgres.log");
        self.run(
            "pg_ctl",
            &["-w", "-t", "30", "-l", log.to_str().unwrap(), "start"],
        )
    }

    fn pg_ctl_stop(&self) -> std::io::Result<Output> {
        self.run("pg_ctl", &["-w", "-t", "30", "-m", "immediate", "stop"])
    }

    /// Runs `bin/tool args... -D DATA_DIR`, as `postgres` when we are root. The cwd is our dir:
    /// root's own cwd may not be readable by `postgres`.
    fn run(&self, tool: &str, args: &[&str]) -> std::io::Result<Output> {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            Command::new(self.bin.join(tool))
        };
        cmd.args(args)
            .arg("-D")
            .arg(&self.data)
            .current_dir(&self.dir)
            .output()
    }

    /// Appends to postgresql.conf (appending keeps the file's owner and mode).
    fn configure(&self, lines: &str) {
        let mut f = OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        f.write_all(format!("\n{lines}\n").as_bytes())
            .expect("write postgresql.conf");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `pg_config --bindir` if it has initdb (libpq-dev's pg_config may be of another version than
/// the server), else the highest-numbered /usr/lib/postgresql/N/bin that has it.
fn bin_dir() -> Option<PathBuf> {
    let from_pg_config = PathBuf::from(stdout(Command::new("pg_config").arg("--bindir")));
    if from_pg_config.join("initdb").is_file() {
        return Some(from_pg_config);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The command's trimmed stdout; empty if it cannot run.
fn stdout(cmd: &mut Command) -> String {
    let out = cmd.output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out).trim().to_string()
}

/// An ephemeral port the kernel just handed out, released for the server to bind.
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    probe.local_addr().expect("probe port").port()
}

/// The last lines of the server's log, where the reason for a failed start is.
fn log_tail(dir: &Path) -> String {
    let log = fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Panics with the command's output and the server log's tail unless it succeeded.
fn check(what: &str, result: std::io::Result<Output>, dir: &Path) {
    match result {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{what} failed ({}):\n{}{}\n--- postgres.log (tail) ---\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            log_tail(dir)
        ),
        Err(e) => panic!("{what}: cannot run it ({e}); run scripts/install-test-deps.sh"),
    }
}
