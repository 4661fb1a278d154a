//! A TCP proxy per directed link between raft_kv nodes, so tests can cut links (partitions)
//! on loopback without network namespaces.
//!
//! Node i reaches node j through the proxy for (i, j): its `raft_kv.peers` lists that proxy's
//! address for j. Cutting a link closes its open connections and refuses traffic until it is
//! restored; the transport sees failed connections, as with a real partition.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

struct Link {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Incremented on every cut: connections from an earlier epoch close themselves.
    epoch: Arc<AtomicU64>,
}

/// All links of a cluster; dropping it stops every proxy thread.
pub struct Net {
    links: BTreeMap<(u64, u64), Link>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl Net {
    /// Starts a proxy for every ordered pair of `nodes` (id → real raft address).
    pub fn start(nodes: &BTreeMap<u64, SocketAddr>) -> Net {
        let stop = Arc::new(AtomicBool::new(false));
        let mut links = BTreeMap::new();
        let mut threads = Vec::new();
        for &from in nodes.keys() {
            for (&to, &target) in nodes {
                if from == to {
                    continue;
                }
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                listener.set_nonblocking(true).unwrap();
                let addr = listener.local_addr().unwrap();
                let cut = Arc::new(AtomicBool::new(false));
                let epoch = Arc::new(AtomicU64::new(0));
                let (c, e, s) = (cut.clone(), epoch.clone(), stop.clone());
                threads.push(thread::spawn(move || accept_loop(listener, target, c, e, s)));
                links.insert((from, to), Link { addr, cut, epoch });
            }
        }
        Net { links, stop, threads: Mutex::new(threads) }
    }

    /// The address node `from` must use to reach node `to`.
    pub fn addr(&self, from: u64, to: u64) -> SocketAddr {
        self.links[&(from, to)].addr
    }

    /// Cuts or restores the directed link from → to.
    pub fn set_cut(&self, from: u64, to: u64, cut: bool) {
        let l = &self.links[&(from, to)];
        if cut {
            l.epoch.fetch_add(1, Ordering::SeqCst);
        }
        l.cut.store(cut, Ordering::SeqCst);
    }

    /// Cuts both directions between every pair of nodes in different groups.
    pub fn partition(&self, groups: &[Vec<u64>]) {
        self.heal();
        let group_of = |id: u64| groups.iter().position(|g| g.contains(&id));
        for &(a, b) in self.links.keys() {
            if group_of(a) != group_of(b) {
                self.set_cut(a, b, true);
            }
        }
    }

    /// Cuts both directions of the given pairs only (for bridges and other shapes).
    pub fn cut_pairs(&self, pairs: &[(u64, u64)]) {
        self.heal();
        for &(a, b) in pairs {
            self.set_cut(a, b, true);
            self.set_cut(b, a, true);
        }
    }

    pub fn heal(&self) {
        for &(a, b) in self.links.keys() {
            self.set_cut(a, b, false);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(l: TcpListener, target: SocketAddr, cut: Arc<AtomicBool>, epoch: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let mut conns: Vec<thread::JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((client, _)) => {
                if cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else { continue };
                let my_epoch = epoch.load(Ordering::SeqCst);
                let (e, s) = (epoch.clone(), stop.clone());
                conns.push(thread::spawn(move || pipe(client, server, my_epoch, e, s)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
        conns.retain(|h| !h.is_finished());
    }
    for h in conns {
        let _ = h.join();
    }
}

/// Copies both ways until either side closes, the link is cut, or the proxy stops.
fn pipe(a: TcpStream, b: TcpStream, my_epoch: u64, epoch: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let alive = || epoch.load(Ordering::SeqCst) == my_epoch && !stop.load(Ordering::SeqCst);
    for s in [&a, &b] {
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
        // A paused receiver must not hold a proxy thread forever.
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_nodelay(true);
    }
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (e2, s2) = (epoch.clone(), stop.clone());
    let back = thread::spawn(move || {
        let alive = || e2.load(Ordering::SeqCst) == my_epoch && !s2.load(Ordering::SeqCst);
        copy(&mut b2, &mut a2, &alive);
        let _ = a2.shutdown(Shutdown::Both);
        let _ = b2.shutdown(Shutdown::Both);
    });
    let (mut a1, mut b1) = (a, b);
    copy(&mut a1, &mut b1, &alive);
    let _ = a1.shutdown(Shutdown::Both);
    let _ = b1.shutdown(Shutdown::Both);
    let _ = back.join();
}

fn copy(from: &mut TcpStream, to: &mut TcpStream, alive: &dyn Fn() -> bool) {
    let mut buf = vec![0u8; 64 << 10];
    while alive() {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if !alive() || to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
    }
}
