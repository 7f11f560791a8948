//! A test certificate authority, one leaf certificate for the AWS names the tests serve TLS
//! under (AppStream's, and where `ip-ranges.json` is published), and the rustls configs built
//! on them.
//!
//! The CA is made once per test binary. Clients trust it the way an operator's users would
//! trust a corporate CA: curl and Python get it as a PEM file, Chromium in its NSS database, Rust
//! clients in a rustls root store. Nothing here is ever trusted outside the test.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The streaming gateway name the tests stream from.
pub const GATEWAY: &str = "gw1.amazonappstream.com";
/// The CloudFront name AppStream loads its web client from.
pub const CLOUDFRONT: &str = "d111abcdef8.cloudfront.net";

/// Where the proxy fetches AWS's `ip-ranges.json` from (tests/ip_ranges.rs serves it on loopback).
pub const IP_RANGES: &str = "ip-ranges.amazonaws.com";

/// The names on the leaf certificate.
pub const NAMES: &[&str] = &[GATEWAY, CLOUDFRONT, IP_RANGES];

pub struct TestCa {
    /// The CA certificate, PEM: what curl's `--cacert` and Python's `verify=` take.
    pub ca_pem: String,
    ca_der: CertificateDer<'static>,
    leaf_der: CertificateDer<'static>,
    leaf_key: Vec<u8>,
}

/// The binary's CA, made on first use.
pub fn ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(TestCa::generate)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestCa {
    fn generate() -> TestCa {
        // Short validity around now, the way a real issuer would do it: browsers are stricter
        // with certificates that claim to live for centuries.
        let now = time::OffsetDateTime::now_utc();
        let not_before = now - time::Duration::days(1);
        let not_after = now + time::Duration::days(30);

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "portcullis test CA");
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, "portcullis tests");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.not_before = not_before;
        ca_params.not_after = not_after;
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
        let mut leaf_params = CertificateParams::new(names).unwrap();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, GATEWAY);
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params.not_before = not_before;
        leaf_params.not_after = not_after;
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        TestCa {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            leaf_der: leaf_cert.der().clone(),
            leaf_key: leaf_key.serialize_der(),
        }
    }

    /// Writes the CA certificate as `ca.pem` into `dir`.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    /// Writes the leaf (with the CA after it) and its key as PEM into `dir`, for a
    /// `[[proxy.tls]]` listener of the binary; returns (cert, key).
    pub fn write_leaf(&self, dir: &Path) -> (PathBuf, PathBuf) {
        use base64::Engine;
        let pem = |label: &str, der: &[u8]| {
            let body = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                lines.join("\n")
            )
        };
        let cert = dir.join("leaf.crt");
        let key = dir.join("leaf.key");
        let chain = pem("CERTIFICATE", &self.leaf_der) + &pem("CERTIFICATE", &self.ca_der);
        std::fs::write(&cert, chain).unwrap();
        std::fs::write(&key, pem("PRIVATE KEY", &self.leaf_key)).unwrap();
        (cert, key)
    }

    /// The origin's config: the leaf for every name, HTTP/1.1 only (WebSockets upgrade on it).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.clone()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.leaf_der.clone(), self.ca_der.clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A client config that trusts the test CA and nothing else.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A TLS handshake for `name` over `stream` (typically a CONNECT tunnel), verified against
    /// the test CA, with `name` as SNI.
    pub async fn connect(&self, name: &str, stream: TcpStream) -> TlsStream<TcpStream> {
        let server_name = ServerName::try_from(name.to_string()).unwrap();
        TlsConnector::from(self.client_config())
            .connect(server_name, stream)
            .await
            .unwrap_or_else(|e| panic!("TLS handshake with {name}: {e}"))
    }
}
