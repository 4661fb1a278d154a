//! Issue 14 (packaging): with the Debian package installed (`scripts/test.sh` builds it with
//! scripts/package.sh and installs it with `dpkg -i` before running this), the server files
//! are the package's, unchanged, and a 3-node cluster runs from them.

use std::process::Command;
use std::time::Duration;

use raft_kv_tests::{wait_for, Cluster};

const PACKAGE: &str = "postgresql-15-raft-kv";

fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs the .deb installed: run by scripts/test.sh's package stage"]
fn a_cluster_runs_from_the_installed_package() {
    let control = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../raft_kv.control")).unwrap();
    let version = control
        .lines()
        .find_map(|l| l.strip_prefix("default_version = '")?.strip_suffix('\''))
        .expect("default_version in raft_kv.control")
        .to_string();
    assert_eq!(
        output("dpkg-query", &["-W", "-f=${Status} ${Version}", PACKAGE]),
        format!("install ok installed {version}")
    );
    for f in [
        "/usr/lib/postgresql/15/lib/raft_kv.so".to_string(),
        "/usr/share/postgresql/15/extension/raft_kv.control".to_string(),
        format!("/usr/share/postgresql/15/extension/raft_kv--{version}.sql"),
    ] {
        assert_eq!(output("dpkg", &["-S", &f]).trim(), format!("{PACKAGE}: {f}"));
    }
    // Every file as the package shipped it (nothing installed over it since).
    assert_eq!(output("dpkg", &["--verify", PACKAGE]), "");

    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    for i in 1..=3 {
        let v: String =
            c.client(i).query_one("SELECT extversion FROM pg_extension WHERE extname = 'raft_kv'", &[]).unwrap().get(0);
        assert_eq!(v, version);
    }
    let f = (1..=3).find(|&i| i != leader).unwrap();
    let rev: i64 = c.client(f).query_one("SELECT raft_set('pkg/k', 'v')", &[]).unwrap().get(0);
    assert!(rev > 0);
    for i in 1..=3 {
        let mut cl = c.client(i);
        wait_for(Duration::from_secs(5), "the write on every node", || {
            let v: Option<String> = cl.query_one("SELECT raft_get('pkg/k', 'local')", &[]).unwrap().get(0);
            (v.as_deref() == Some("v")).then_some(())
        });
    }
    let lin: Option<String> = c.client(f).query_one("SELECT raft_get('pkg/k')", &[]).unwrap().get(0);
    assert_eq!(lin.as_deref(), Some("v"));
}
