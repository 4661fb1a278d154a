//! Mutual TLS for the Raft port: loading a node's certificate, key and CA, and reading the
//! identity a peer's certificate proves.
//!
//! A node's certificate names it with a URI SAN `raft-kv://<cluster>/node/<id>` and a DNS SAN
//! `node-<id>.<cluster>.raft-kv` (what a dialling node asks for as the server name, whatever
//! address or proxy it dials). Both ends present one, signed by the cluster's CA; TLS 1.3
//! only, rustls with the ring provider.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} \"{path}\": {err}")]
    Read { what: &'static str, path: String, err: String },
    #[error("{0}")]
    Config(String),
    #[error("the certificate does not name a raft_kv node: {0}")]
    Identity(String),
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cluster: String,
    pub node: u64,
}

const SCHEME: &str = "raft-kv://";

/// Parses `raft-kv://<cluster>/node/<id>`.
pub fn parse_identity_uri(uri: &str) -> Option<Identity> {
    let rest = uri.strip_prefix(SCHEME)?;
    let (cluster, id) = rest.split_once("/node/")?;
    let valid_cluster = !cluster.is_empty()
        && cluster.len() <= 63
        && cluster.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let node: u64 = id.parse().ok()?;
    (valid_cluster && node > 0 && id == node.to_string()).then(|| Identity { cluster: cluster.to_string(), node })
}

/// The raft_kv identity in an end-entity certificate: its one `raft-kv://` URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    use x509_parser::prelude::*;
    let (_, x) = parse_x509_certificate(cert.as_ref()).map_err(|e| TlsError::Identity(e.to_string()))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .ok_or_else(|| TlsError::Identity("it has no subjectAltName".into()))?;
    let mut found = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with(SCHEME) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (found.next(), found.next()) else {
        return Err(TlsError::Identity(format!("it needs exactly one URI SAN {SCHEME}<cluster>/node/<id>")));
    };
    parse_identity_uri(uri).ok_or_else(|| TlsError::Identity(format!("malformed URI SAN \"{uri}\"")))
}

/// The server name a node asks for when it dials node `id`.
pub fn server_name(cluster: &str, id: u64) -> ServerName<'static> {
    ServerName::try_from(format!("node-{id}.{cluster}.raft-kv")).expect("cluster names are DNS labels")
}

/// Everything the transport needs for mutual TLS.
pub struct TlsSetup {
    pub me: Identity,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsSetup({:?})", self.me)
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { what, path: path.display().to_string(), err: e.to_string() })
}

impl TlsSetup {
    /// Loads PEM files and checks that the certificate names node `node_id`.
    pub fn load(cert: &Path, key: &Path, ca: &Path, node_id: u64) -> Result<TlsSetup, TlsError> {
        Self::from_pem(&read("ssl_cert_file", cert)?, &read("ssl_key_file", key)?, &read("ssl_ca_file", ca)?, node_id)
    }

    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8], node_id: u64) -> Result<TlsSetup, TlsError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| TlsError::Config(format!("{what}: {e}"));
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert).collect::<Result<_, _>>().map_err(|e| bad("ssl_cert_file", &e))?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Config("ssl_cert_file holds no certificate".into()));
        };
        let me = identity_of(leaf)?;
        if me.node != node_id {
            return Err(TlsError::Identity(format!("it names node {} but raft_kv.node_id is {node_id}", me.node)));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("ssl_key_file", &e))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            roots.add(c.map_err(|e| bad("ssl_ca_file", &e))?).map_err(|e| bad("ssl_ca_file", &e))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Config("ssl_ca_file holds no certificate".into()));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| bad("ssl_ca_file", &e))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("TLS", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| bad("ssl_cert_file/ssl_key_file", &e))?;
        // Connections are long-lived and never resumed: no session tickets.
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("TLS", &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("ssl_cert_file/ssl_key_file", &e))?;
        Ok(TlsSetup { me, server: Arc::new(server), client: Arc::new(client) })
    }
}

/// Throw-away certificates for tests: a CA and node certificates signed by it.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };

    pub struct Ca {
        pub pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    /// A node's certificate and key, PEM.
    pub struct NodeCert {
        pub cert: String,
        pub key: String,
    }

    impl Ca {
        pub fn new() -> Ca {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let k = KeyPair::generate().unwrap();
            let pem = p.self_signed(&k).unwrap().pem();
            Ca { pem, issuer: Issuer::new(p, k) }
        }

        /// A certificate for node `id` of `cluster`.
        pub fn node(&self, cluster: &str, id: u64) -> NodeCert {
            self.with_uri(cluster, id, &format!("raft-kv://{cluster}/node/{id}"))
        }

        /// A certificate whose DNS name is node `id`'s but whose URI SAN is `uri`.
        pub fn with_uri(&self, cluster: &str, id: u64, uri: &str) -> NodeCert {
            let mut p = CertificateParams::new(vec![format!("node-{id}.{cluster}.raft-kv")]).unwrap();
            p.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let k = KeyPair::generate().unwrap();
            let cert = p.signed_by(&k, &self.issuer).unwrap().pem();
            NodeCert { cert, key: k.serialize_pem() }
        }
    }

    impl Default for Ca {
        fn default() -> Self {
            Self::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris() {
        assert_eq!(parse_identity_uri("raft-kv://c1/node/3"), Some(Identity { cluster: "c1".into(), node: 3 }));
        for bad in [
            "raft-kv://c1/node/0",
            "raft-kv://c1/node/03",
            "raft-kv:///node/1",
            "raft-kv://C1/node/1",
            "http://c1/node/1",
            "raft-kv://c1/node/1/x",
            "raft-kv://c.1/node/1",
        ] {
            assert_eq!(parse_identity_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_node_certificate_loads_and_names_its_node() {
        let ca = testing::Ca::new();
        let n = ca.node("c1", 2);
        let t = TlsSetup::from_pem(n.cert.as_bytes(), n.key.as_bytes(), ca.pem.as_bytes(), 2).unwrap();
        assert_eq!(t.me, Identity { cluster: "c1".into(), node: 2 });
        let e = TlsSetup::from_pem(n.cert.as_bytes(), n.key.as_bytes(), ca.pem.as_bytes(), 3).unwrap_err();
        assert!(e.to_string().contains("names node 2 but raft_kv.node_id is 3"), "{e}");
        let odd = ca.with_uri("c1", 2, "raft-kv://c1/node/x");
        let e = TlsSetup::from_pem(odd.cert.as_bytes(), odd.key.as_bytes(), ca.pem.as_bytes(), 2).unwrap_err();
        assert!(e.to_string().contains("malformed URI SAN"), "{e}");
    }
}
