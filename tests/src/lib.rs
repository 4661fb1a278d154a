//! A harness for multi-node tests of raft_kv on real PostgreSQL 15 servers.
//!
//! `Cluster::start` creates N servers in a temporary directory, each on free loopback ports
//! with `shared_preload_libraries = 'raft_kv'`, and runs `CREATE EXTENSION raft_kv` on each.
//! Nodes can be stopped (`pg_ctl -m fast|immediate`), killed (`SIGKILL`), paused (`SIGSTOP`)
//! and restarted. Dropping the cluster, including during a panic, stops every server and
//! removes the directory. As root, servers run as the `postgres` user.

pub mod linearizability;
pub mod proxy;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use postgres::{Client, Error as PgError, NoTls};
pub use raft_kv_core::tls::testing::Ca;
use raft_kv_core::tls::TlsSetup;
pub use raft_kv_core::transport::Security;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command as the postgres user when we are root, as ourselves otherwise.
fn pg_command(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str) -> Output {
    c.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    c.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"))
}

fn chown_to_postgres(p: &Path) {
    if is_root() {
        let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(p).status().unwrap();
        assert!(st.success(), "chown {p:?}");
    }
}

/// A loopback port nothing listens on right now, never handed out before by this process.
///
/// Drawn below the kernel's ephemeral range (32768 and up), so sockets that bind port 0 (the
/// proxies, outgoing connections) cannot take it between now and the server's start.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let p: u16 = rand::random::<u16>() % 12000 + 20000;
        if !given.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.push(p);
            return p;
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    wait_showing(timeout, what, || f().ok_or(()))
}

/// As [`wait_for`], where `f` says what it saw when the condition does not hold yet: a
/// timeout then shows the last of that, so a failure in CI explains itself.
pub fn wait_showing<T, E: std::fmt::Debug>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen:?}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One initdb per test process, copied for every node: initdb is the slow part of a start.
fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("raft_kv-test-template-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        chown_to_postgres(&dir);
        let data = dir.join("data");
        let mut c = pg_command(&format!("{PG_BIN}/initdb"));
        c.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"]);
        let out = run(c, "initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        data
    })
}

#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: u64,
    pub pg_port: u16,
    pub raft_port: u16,
}

pub struct Node {
    pub spec: NodeSpec,
    pub dir: PathBuf,
    /// The PostgreSQL installation's bin directory it runs from ([`PG_BIN`] unless a test
    /// runs another installation, as the upgrade test does).
    pub bin: std::sync::Mutex<PathBuf>,
}

impl Node {
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    pub fn conn_str(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5", self.spec.pg_port)
    }
    pub fn raft_addr(&self) -> String {
        format!("127.0.0.1:{}", self.spec.raft_port)
    }
    /// The postmaster's pid, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let s = fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        s.lines().next()?.trim().parse().ok()
    }
}

/// How each node's postgresql.conf is extended: given the node and the full peer list.
pub type ConfFn = Box<dyn Fn(&NodeSpec, &str) -> String>;

pub struct Cluster {
    pub root: PathBuf,
    pub nodes: Vec<Node>,
    /// The cluster's throw-away CA: every node's certificate comes from it (tests mint more
    /// to play peers, or attackers).
    pub ca: Ca,
    /// Lines added to every node's configuration.
    extra_conf: String,
    /// Per-link proxies, when the cluster was built with `proxied()`. Declared after the
    /// nodes so it is dropped after the servers are stopped.
    pub net: Option<proxy::Net>,
}

pub struct Builder {
    n: usize,
    extra_conf: String,
    conf: Option<ConfFn>,
    proxied: bool,
    plain: bool,
    bin: Option<PathBuf>,
}

impl Builder {
    /// Adds a line to every node's postgresql.conf.
    pub fn conf(mut self, line: &str) -> Self {
        self.extra_conf.push_str(line);
        self.extra_conf.push('\n');
        self
    }
    /// Replaces the raft_kv lines of each node's configuration.
    pub fn raft_conf(mut self, f: impl Fn(&NodeSpec, &str) -> String + 'static) -> Self {
        self.conf = Some(Box::new(f));
        self
    }
    /// Runs the Raft port without TLS (`raft_kv.peer_tls = off`, development mode).
    pub fn plain(mut self) -> Self {
        self.plain = true;
        self
    }
    /// Runs every node from another PostgreSQL installation's bin directory.
    pub fn bin(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin = Some(dir.into());
        self
    }
    /// Routes every link between nodes through a proxy the test can cut (`Cluster::net`).
    pub fn proxied(mut self) -> Self {
        self.proxied = true;
        self
    }

    pub fn start(self) -> Cluster {
        let root = std::env::temp_dir().join(format!(
            "raft_kv-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let ca = Ca::new();
        let specs: Vec<NodeSpec> =
            (1..=self.n as u64).map(|id| NodeSpec { id, pg_port: free_port(), raft_port: free_port() }).collect();
        let peers = specs.iter().map(|s| format!("{}=127.0.0.1:{}", s.id, s.raft_port)).collect::<Vec<_>>().join(",");
        let net = self.proxied.then(|| {
            proxy::Net::start(
                &specs.iter().map(|s| (s.id, format!("127.0.0.1:{}", s.raft_port).parse().unwrap())).collect(),
            )
        });
        // With proxies, each node reaches every other through its own link.
        let peers_for = |me: &NodeSpec| match &net {
            None => peers.clone(),
            Some(net) => specs
                .iter()
                .map(|s| {
                    if s.id == me.id {
                        format!("{}=127.0.0.1:{}", s.id, s.raft_port)
                    } else {
                        format!("{}={}", s.id, net.addr(me.id, s.id))
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
        };
        let mut nodes = Vec::new();
        for spec in &specs {
            let dir = root.join(format!("node{}", spec.id));
            fs::create_dir_all(&dir).unwrap();
            let st = Command::new("cp").arg("-a").arg(template()).arg(dir.join("data")).status().unwrap();
            assert!(st.success(), "copying the template data directory");
            let raft = match &self.conf {
                Some(f) => f(spec, &peers_for(spec)),
                None => default_raft_conf(spec, &peers_for(spec)),
            };
            let tls = if self.plain { "raft_kv.peer_tls = off\n".to_string() } else { write_certs(&ca, &dir, &raft) };
            let mut f = fs::OpenOptions::new().append(true).open(dir.join("data/postgresql.conf")).unwrap();
            write!(
                f,
                "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 logging_collector = off\n{}{}\n{}\n",
                spec.pg_port,
                dir.display(),
                tls,
                raft,
                self.extra_conf
            )
            .unwrap();
            nodes.push(Node {
                spec: spec.clone(),
                dir,
                bin: std::sync::Mutex::new(self.bin.clone().unwrap_or_else(|| PG_BIN.into())),
            });
        }
        chown_to_postgres(&root);
        let c = Cluster { root, nodes, ca, extra_conf: self.extra_conf, net };
        for i in 1..=c.nodes.len() {
            c.start_node(i);
        }
        for i in 1..=c.nodes.len() {
            c.client(i).batch_execute("CREATE EXTENSION raft_kv").unwrap();
        }
        c
    }
}

/// The name of every test cluster in its certificates.
pub const CLUSTER_NAME: &str = "test";

/// Writes a certificate for the node the raft_kv lines configure (by their node_id) into its
/// directory, and returns the settings that point at it (relative to the data directory).
fn write_certs(ca: &Ca, dir: &Path, raft_lines: &str) -> String {
    let id = raft_lines
        .lines()
        .find_map(|l| l.trim().strip_prefix("raft_kv.node_id = ")?.trim().parse::<u64>().ok())
        .filter(|&id| id > 0)
        .unwrap_or(1);
    let cert = ca.node(CLUSTER_NAME, id);
    fs::write(dir.join("node.pem"), &cert.cert).unwrap();
    fs::write(dir.join("node.key"), &cert.key).unwrap();
    fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    chown_to_postgres(dir);
    "raft_kv.ssl_cert_file = '../node.pem'\nraft_kv.ssl_key_file = '../node.key'\nraft_kv.ssl_ca_file = '../ca.pem'\n"
        .to_string()
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// raft_kv lines for a new node that does not bootstrap: it waits to be added with raft_join.
pub fn joiner_conf(spec: &NodeSpec) -> String {
    default_raft_conf(spec, "")
}

pub fn default_raft_conf(spec: &NodeSpec, peers: &str) -> String {
    format!(
        "shared_preload_libraries = 'raft_kv'\nraft_kv.node_id = {}\nraft_kv.listen_addr = '127.0.0.1:{}'\nraft_kv.peers = '{}'\n",
        spec.id, spec.raft_port, peers
    )
}

#[derive(Clone, Copy, Debug)]
pub enum Stop {
    Fast,
    Immediate,
}

impl Cluster {
    pub fn builder(n: usize) -> Builder {
        Builder { n, extra_conf: String::new(), conf: None, proxied: false, plain: false, bin: None }
    }

    pub fn start(n: usize) -> Cluster {
        Self::builder(n).start()
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Creates and starts one more server, with `raft_lines` as its raft_kv settings (given
    /// its spec), and creates the extension on it. Returns its index.
    pub fn add_node(&mut self, raft_lines: impl Fn(&NodeSpec) -> String) -> usize {
        let id = self.nodes.len() as u64 + 1;
        let spec = NodeSpec { id, pg_port: free_port(), raft_port: free_port() };
        let dir = self.root.join(format!("node{id}"));
        fs::create_dir_all(&dir).unwrap();
        let st = Command::new("cp").arg("-a").arg(template()).arg(dir.join("data")).status().unwrap();
        assert!(st.success(), "copying the template data directory");
        let raft = raft_lines(&spec);
        let tls = write_certs(&self.ca, &dir, &raft);
        let mut f = fs::OpenOptions::new().append(true).open(dir.join("data/postgresql.conf")).unwrap();
        write!(
            f,
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nlogging_collector = off\n{}{}\n{}\n",
            spec.pg_port,
            dir.display(),
            tls,
            raft,
            self.extra_conf
        )
        .unwrap();
        chown_to_postgres(&dir);
        self.nodes.push(Node { spec, dir, bin: std::sync::Mutex::new(PG_BIN.into()) });
        let i = self.nodes.len();
        self.start_node(i);
        self.client(i).batch_execute("CREATE EXTENSION raft_kv").unwrap();
        i
    }

    /// Runs node `i` from another installation from its next start on.
    pub fn set_bin(&self, i: usize, dir: impl Into<PathBuf>) {
        *self.nodes[i - 1].bin.lock().unwrap() = dir.into();
    }

    pub fn start_node(&self, i: usize) {
        let n = self.node(i);
        let mut c = pg_command(&format!("{}/pg_ctl", n.bin.lock().unwrap().display()));
        c.arg("-D").arg(n.data()).arg("-l").arg(n.log_path()).args(["-w", "-t", "60", "start"]);
        let out = run(c, "pg_ctl start");
        assert!(out.status.success(), "node {i} did not start: {}\n{}", String::from_utf8_lossy(&out.stderr), n.log());
    }

    pub fn stop_node(&self, i: usize, mode: Stop) {
        let n = self.node(i);
        let m = match mode {
            Stop::Fast => "fast",
            Stop::Immediate => "immediate",
        };
        let mut c = pg_command(&format!("{}/pg_ctl", n.bin.lock().unwrap().display()));
        c.arg("-D").arg(n.data()).args(["-m", m, "-w", "-t", "60", "stop"]);
        let out = run(c, "pg_ctl stop");
        assert!(out.status.success(), "stopping node {i}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Every process of node `i`'s server: the postmaster and its children.
    pub fn pids(&self, i: usize) -> Vec<i32> {
        let Some(pm) = self.node(i).postmaster_pid() else { return Vec::new() };
        let out = Command::new("pgrep").args(["-P", &pm.to_string()]).output().unwrap();
        let mut pids: Vec<i32> =
            String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect();
        pids.insert(0, pm);
        pids
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) every process of node `i`'s server.
    pub fn pause(&self, i: usize, paused: bool) {
        let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        for pid in self.pids(i) {
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// `kill -9` of node `i`'s whole server, as a machine crash would end it; waits until
    /// every process is gone so it can be started again.
    pub fn kill9(&self, i: usize) {
        let pids = self.pids(i);
        for &pid in &pids {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Zombies count as gone: whoever inherited them may never reap them.
        let alive = |p: i32| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
                .unwrap_or(false)
        };
        wait_for(Duration::from_secs(30), "the killed processes to exit", || {
            pids.iter().all(|&p| !alive(p)).then_some(())
        });
        // As after a reboot: an unreaped zombie would otherwise look like a live postmaster
        // to the next start's checks of its lock files.
        let n = self.node(i);
        let _ = fs::remove_file(n.data().join("postmaster.pid"));
        let _ = fs::remove_file(n.dir.join(format!(".s.PGSQL.{}.lock", n.spec.pg_port)));
        let _ = fs::remove_file(n.dir.join(format!(".s.PGSQL.{}", n.spec.pg_port)));
    }

    pub fn client(&self, i: usize) -> Client {
        Client::connect(&self.node(i).conn_str(), NoTls)
            .unwrap_or_else(|e| panic!("connecting to node {i}: {e}\n{}", self.node(i).log()))
    }

    pub fn try_client(&self, i: usize) -> Option<Client> {
        Client::connect(&self.node(i).conn_str(), NoTls).ok()
    }

    /// (role, term, leader_id) from node `i`'s raft_status(), None when unreachable.
    pub fn raft_view(&self, i: usize) -> Option<(String, i64, Option<i64>)> {
        let mut c = self.try_client(i)?;
        let r = c.query_one("SELECT role, term, leader_id FROM raft_status()", &[]).ok()?;
        Some((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i64>>(1)?, r.get(2)))
    }

    /// Waits until every node in `among` agrees on one leader in one term; returns (leader, term).
    pub fn wait_leader(&self, among: &[usize], timeout: Duration) -> (usize, i64) {
        wait_for(timeout, "a leader all nodes agree on", || {
            let views: Vec<_> = among.iter().map(|&i| self.raft_view(i)).collect::<Option<Vec<_>>>()?;
            let (_, term, leader) = views[0].clone();
            let leader = leader?;
            let agree = views.iter().all(|(_, t, l)| *t == term && *l == Some(leader));
            let leaders = views.iter().filter(|(r, _, _)| r == "leader").count();
            (agree && leaders == 1 && among.contains(&(leader as usize))).then_some((leader as usize, term))
        })
    }

    /// A hash of node `i`'s ordered key-value table.
    pub fn kv_hash(&self, i: usize) -> (i64, String) {
        let mut c = self.client(i);
        let r = c
            .query_one(
                "SELECT count(*), coalesce(md5(string_agg(key || '=' || value || '@' || mod_revision || '/' || create_revision || '/' || version, ',' ORDER BY key)), '') \
                 FROM raft_kv.kv",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    }

    /// Waits until the listed nodes have applied the same index, then asserts their tables
    /// are identical.
    pub fn assert_converged(&self, nodes: &[usize]) {
        wait_for(Duration::from_secs(30), "nodes to converge", || {
            let idx: Vec<_> = nodes.iter().map(|&i| self.applied_index(i)).collect::<Option<Vec<_>>>()?;
            idx.windows(2).all(|w| w[0] == w[1]).then_some(())
        });
        let hashes: Vec<_> = nodes.iter().map(|&i| self.kv_hash(i)).collect();
        assert!(hashes.windows(2).all(|w| w[0] == w[1]), "kv tables differ: {hashes:?}");
    }

    /// TLS credentials of a peer calling itself node `id` of `cluster`, from `ca`: what a test
    /// playing a peer (or an attacker holding a stolen or stray certificate) presents.
    pub fn peer_security(ca: &Ca, cluster: &str, id: u64) -> Security {
        let n = ca.node(cluster, id);
        let t = TlsSetup::from_pem(n.cert.as_bytes(), n.key.as_bytes(), ca.pem.as_bytes(), id).unwrap();
        Security::Tls(std::sync::Arc::new(t))
    }

    /// Node `i`'s raft_kv worker pid, None while it has none (or the node is down).
    pub fn worker_pid(&self, i: usize) -> Option<i32> {
        self.try_client(i)?.query_one("SELECT worker_pid FROM raft_status()", &[]).ok()?.get(0)
    }

    /// The private memory (RssAnon, KiB) of process `pid`.
    pub fn rss_anon_kib(pid: i32) -> Option<u64> {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        s.lines().find_map(|l| l.strip_prefix("RssAnon:"))?.trim().trim_end_matches("kB").trim().parse().ok()
    }

    /// Node `i`'s cluster id, once its first leader has set it.
    pub fn cluster_id(&self, i: usize) -> u128 {
        wait_for(Duration::from_secs(20), "the cluster id", || {
            let s: Option<String> =
                self.try_client(i)?.query_one("SELECT cluster_id FROM raft_status()", &[]).ok()?.get(0);
            u128::from_str_radix(&s?, 16).ok()
        })
    }

    pub fn applied_index(&self, i: usize) -> Option<i64> {
        self.try_client(i)?.query_one("SELECT applied_index FROM raft_status()", &[]).ok()?.get(0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=self.nodes.len() {
            let n = self.node(i);
            if n.postmaster_pid().is_some() {
                // A paused server cannot stop.
                self.pause(i, false);
                let mut c = pg_command(&format!("{}/pg_ctl", n.bin.lock().unwrap().display()));
                c.arg("-D").arg(n.data()).args(["-m", "immediate", "-w", "-t", "30", "stop"]);
                let _ = run(c, "pg_ctl stop");
            }
        }
        if std::env::var_os("RAFT_KV_KEEP_TEST_DIRS").is_none() {
            remove_tree(&self.root);
        }
    }
}

/// Removes a cluster's directory. A server that was still starting when the test ended has no
/// pid file yet, so `pg_ctl stop` missed it and it keeps creating files: any process working
/// in the directory is killed, and the removal is retried until it succeeds.
fn remove_tree(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for pid in processes_in(root) {
            // SAFETY: plain signals to processes of this test's own servers.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
                libc::kill(pid, libc::SIGKILL);
            }
        }
        match fs::remove_dir_all(root) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("could not remove {}: {e}", root.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Processes whose working directory is inside `root` (a postmaster and its children run in
/// their data directory).
fn processes_in(root: &Path) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(root)))
        .collect()
}

/// Sets a flag when dropped: stops worker threads however a test body ends (a failed
/// assertion included), so a scoped thread never outlives its test.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Writes until `stop`, through node `home` (another node while it is down), as the README
/// tells clients to: one request id per write, retried on 40001/40003 and lost connections.
/// Returns the number of writes and the last value acknowledged for each key it wrote. Each write is retried with its request id until it is
/// acknowledged or 20 s pass (then it counts as failed).
pub fn steady_writer(
    c: &Cluster,
    home: usize,
    tag: &str,
    stop: &AtomicBool,
    failed: &AtomicUsize,
    longest_ms: &AtomicU64,
) -> (u64, BTreeMap<String, String>) {
    let mut conn: Option<(usize, Client)> = None;
    let mut n = 0u64;
    let mut acked = BTreeMap::new();
    let mut last_ok = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (key, value, rid) = (format!("w{home}/{}", n % 10), format!("v{n}"), format!("{tag}-{home}-{n}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let Some((_, cl)) = conn.as_mut() else {
                let order = [home, home % 3 + 1, (home + 1) % 3 + 1];
                conn = order.iter().find_map(|&i| c.try_client(i).map(|cl| (i, cl)));
                if conn.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                continue;
            };
            match cl.query_one("SELECT raft_set($1, $2, $3)", &[&key, &value, &rid]) {
                Ok(_) => {
                    acked.insert(key.clone(), value.clone());
                    let gap = last_ok.elapsed().as_millis() as u64;
                    longest_ms.fetch_max(gap, Ordering::Relaxed);
                    last_ok = Instant::now();
                    break;
                }
                Err(e) => {
                    // 40001 / 40003: retry with the same id; a lost connection: reconnect.
                    if cl.is_closed() || e.as_db_error().is_none() {
                        conn = None;
                    }
                    if Instant::now() > deadline {
                        eprintln!("writer {home}: write {n} failed after 20 s of retries: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        // Back home once it is up again.
        if conn.as_ref().is_some_and(|(i, _)| *i != home) {
            if let Some(cl) = c.try_client(home) {
                conn = Some((home, cl));
            }
        }
    }
    (n, acked)
}
