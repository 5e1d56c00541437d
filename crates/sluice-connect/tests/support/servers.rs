//! Servers tests start for themselves from the machine's binaries, on free loopback ports,
//! with their data in a temporary directory: never the machine's shared instances.
//! (Included by path from the test crates that need it.)

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        wait_for_port(port, "redis-server");
        RedisServer { child, port, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster of its own: initdb into a temporary directory, started with pg_ctl
/// (as the `postgres` user when the tests run as root, which initdb refuses), fsync off.
pub struct PgServer {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().expect("PostgreSQL server binaries under /usr/lib/postgresql/*/bin (scripts/test.sh installs them)")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn pg_command(bin: &PathBuf, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

impl PgServer {
    pub fn start() -> PgServer {
        Self::start_with_tls(None)
    }

    /// A cluster that takes TCP connections only over TLS, with this certificate and key
    /// (`hostnossl` is rejected; the unix socket in [`PgServer::socket_dir`] stays open).
    pub fn start_with_tls(tls: Option<(&std::path::Path, &std::path::Path)>) -> PgServer {
        let bin = pg_bin();
        let dir = tempfile::Builder::new().prefix("sluice-pg").tempdir().unwrap();
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap().success();
            assert!(ok, "chown of the PostgreSQL test directory");
        }
        let data = dir.path().join("data");
        let out = pg_command(&bin, "initdb").args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"]).arg(&data).output().unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let mut opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c timezone=UTC -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10", dir.path().display());
        if let Some((cert, key)) = tls {
            std::fs::copy(cert, data.join("server.crt")).unwrap();
            std::fs::copy(key, data.join("server.key")).unwrap();
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\nhostnossl replication all 127.0.0.1/32 reject\n",
            )
            .unwrap();
            let own = |f: &str| {
                if is_root() {
                    assert!(Command::new("chown").args(["postgres:postgres"]).arg(data.join(f)).status().unwrap().success());
                }
            };
            own("server.crt");
            own("server.key");
            own("pg_hba.conf");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let out = pg_command(&bin, "pg_ctl")
            .args(["-w", "-t", "60", "-l"])
            .arg(dir.path().join("log"))
            .args(["-o", &opts, "-D"])
            .arg(&data)
            .arg("start")
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
        wait_for_port(port, "postgres");
        PgServer { bin, data, port, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The directory of its unix socket (no TLS needed there).
    pub fn socket_dir(&self) -> &std::path::Path {
        self._dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, "pg_ctl").args(["-m", "immediate", "-D"]).arg(&self.data).arg("stop").stdout(Stdio::null()).status();
    }
}

/// A MariaDB server with the binlog in ROW format and full row metadata (what change data
/// capture needs), root without a password on 127.0.0.1 and a database `shop`.
pub struct MariaServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
    /// A MySQL server run by this launcher instead of MariaDB (see [`MariaServer::start_mysql`]).
    mysqld: Option<String>,
}

impl MariaServer {
    pub fn start() -> MariaServer {
        let dir = tempfile::Builder::new().prefix("sluice-maria").tempdir().unwrap();
        // Its own temporary directory: bootstraps running side by side in /tmp have been seen
        // to fail removing their temporary tables.
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--auth-root-authentication-method=normal", "--skip-test-db"])
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg(format!("--tmpdir={}", dir.path().join("tmp").display()))
            .args(if is_root() { vec!["--user=root"] } else { vec![] })
            .output()
            .expect("mariadb-install-db (scripts/test.sh installs mariadb-server)");
        assert!(out.status.success(), "mariadb-install-db: {}", String::from_utf8_lossy(&out.stderr));
        let mut m = MariaServer { child: None, dir, port: free_port(), mysqld: None };
        m.spawn();
        let out = m.cli("CREATE DATABASE shop");
        assert!(out.status.success(), "create database: {}", String::from_utf8_lossy(&out.stderr));
        m
    }

    /// A MySQL server, run by `mysqld`: a command that starts mysqld with `--no-defaults` and
    /// its base directory and then the arguments given (`scripts/mysql-ubuntu.sh` and
    /// `scripts/mysql-sid.sh` write one).
    pub fn start_mysql(mysqld: &str) -> MariaServer {
        let dir = tempfile::Builder::new().prefix("sluice-mysql").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let out = Command::new(mysqld)
            .arg("--initialize-insecure")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args(if is_root() { vec!["--user=root"] } else { vec![] })
            .output()
            .expect("the MySQL launcher (scripts/mysql-ubuntu.sh or scripts/mysql-sid.sh)");
        assert!(out.status.success(), "mysqld --initialize-insecure: {}", String::from_utf8_lossy(&out.stderr));
        let mut m = MariaServer { child: None, dir, port: free_port(), mysqld: Some(mysqld.to_string()) };
        m.spawn();
        let out = m.cli("CREATE DATABASE shop");
        assert!(out.status.success(), "create database: {}", String::from_utf8_lossy(&out.stderr));
        m
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let mut cmd = match &self.mysqld {
            Some(launcher) => {
                let mut c = Command::new(launcher);
                c.args(["--mysqlx=OFF", "--secure-file-priv="]);
                c
            }
            None => {
                let mut c = Command::new("mariadbd");
                // MariaDB only: MySQL's root is root@localhost, which 127.0.0.1 matches only by name.
                c.args(["--no-defaults", "--skip-name-resolve"]);
                c
            }
        };
        // More server options, e.g. "--gtid-mode=ON --enforce-gtid-consistency=ON" (MySQL) or
        // "--log-bin-compress=ON" (MariaDB).
        cmd.args(std::env::var("SLUICE_TEST_MYSQLD_ARGS").unwrap_or_default().split_whitespace());
        let child = cmd
            .args(if is_root() { vec!["--user=root"] } else { vec![] })
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", d.join("sock").display()))
            .arg(format!("--pid-file={}", d.join("pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg(format!("--log-bin={}", d.join("data").join("binlog").display()))
            .args(["--binlog-format=ROW", "--binlog-row-metadata=FULL", "--server-id=1", "--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0"])
            .args(["--innodb-buffer-pool-size=64M", "--max-connections=50", "--default-time-zone=+00:00"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd (scripts/test.sh installs mariadb-server)");
        self.child = Some(child);
        wait_for_port(self.port, "mariadbd");
    }

    /// Runs SQL with the mariadb client (over the socket, as root).
    pub fn cli(&self, sql: &str) -> std::process::Output {
        Command::new("mariadb")
            .args(["-u", "root", "-N", "-B"])
            .arg(format!("--socket={}", self.dir.path().join("sock").display()))
            .args(["-e", sql])
            .output()
            .unwrap()
    }

    /// Runs SQL in database `shop` and returns what it printed (tab-separated rows).
    pub fn sql(&self, sql: &str) -> String {
        let out = self.cli(&format!("USE shop; {sql}"));
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/shop", self.port)
    }

    /// Stops the server (kill -9) until [`MariaServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for MariaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA and a certificate it signed for `localhost` (openssl CLI; no IP address in it, so
/// `127.0.0.1` does not match its name): (ca.pem, cert.pem, key.pem).
pub fn private_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (scripts/test.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sluice test CA"]);
    run(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=localhost"]);
    std::fs::write(p("leaf.ext"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
    run(&["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "leaf.ext"]);
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}
