//! TLS to the proxy itself (`[[proxy.tls]]`): HTTPS proxy clients, mutual TLS with client
//! names usable in `[clients]`, and certificates renewed by a reload.

mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{Origin, Setup, TestProxy, assert_echo, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const HOST: &str = "gw1.amazonappstream.com";

/// A CA that signs the proxy's certificate and client certificates, written as PEM files.
struct Pki {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            issuer: Issuer::new(params, key),
            ca_pem: cert.pem(),
        }
    }

    fn ca_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// A leaf for the proxy at 127.0.0.1; returns (cert path, key path).
    fn server_leaf(&self, file: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["proxy.test".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.write_leaf(params, file)
    }

    fn client_leaf(&self, name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.write_leaf(params, &format!("{}-{name}", self.name))
    }

    fn write_leaf(&self, params: CertificateParams, file: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.join(format!("{file}.crt"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client that trusts `ca_pem`, with a client certificate if given.
fn connector(ca_pem: &str, client: Option<&(PathBuf, PathBuf)>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    TlsConnector::from(Arc::new(config))
}

async fn tls_to_proxy(
    proxy: &TestProxy,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(proxy.tls_addrs[0]).await?;
    let name = ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into());
    let mut tls = connector.connect(name, tcp).await?;
    // TLS 1.3 reports a rejected client certificate only on the first read.
    tls.flush().await?;
    Ok(tls)
}

/// Sends a CONNECT over the TLS connection and returns the status code.
async fn connect_over(tls: &mut TlsStream<TcpStream>, authority: &str) -> std::io::Result<u16> {
    tls.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tls.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head)[9..12].parse().unwrap())
}

fn tls_table(cert: &Path, key: &Path, client_ca: Option<&Path>) -> String {
    let mut table = format!(
        "[[proxy.tls]]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    );
    if let Some(ca) = client_ca {
        table.push_str(&format!("client_ca = {:?}\n", ca.to_str().unwrap()));
    }
    table
}

async fn proxy_with(
    proxy_tls: String,
    allow_cert_names: Vec<&'static str>,
    origin: &Origin,
) -> TestProxy {
    let setup = Setup {
        proxy_tls,
        allow_cert_names,
        extra_rules: support::rule_for(HOST, origin),
        ..Setup::default()
    };
    support::start_answering(setup, HOST).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_through_an_https_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "proxy-ca");
    let (cert, key) = pki.server_leaf("proxy");
    let origin = Origin::echo().await;
    let proxy = proxy_with(tls_table(&cert, &key, None), vec![], &origin).await;
    let mut tls = tls_to_proxy(&proxy, &connector(&pki.ca_pem, None))
        .await
        .unwrap();
    let authority = format!("{HOST}:{}", origin.addr.port());
    assert_eq!(connect_over(&mut tls, &authority).await.unwrap(), 200);
    let payload: Vec<u8> = (0..200_000).map(|i| (i % 251) as u8).collect();
    tls.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
    // The plain listener keeps working beside it.
    let (reply, mut plain) = support::connect(proxy.addr, &authority).await;
    assert_eq!(reply.status, 200);
    assert_echo(&mut plain, b"plain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_https_to_the_proxy() {
    if !support::have_tool("curl", &["curl", "--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "proxy-ca");
    let (cert, key) = pki.server_leaf("proxy");
    let origin_ip = "127.0.0.71";
    let origin = support::web::WebOrigin::start(origin_ip).await;
    let setup = Setup {
        proxy_tls: tls_table(&cert, &key, None),
        ..Setup::default()
    };
    let proxy = start(setup).await;
    proxy.dns.set(HOST, &[origin_ip.parse().unwrap()], 60);
    let origin_ca = support::tls::ca().write_ca(dir.path());
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--proxy"])
        .arg(format!("https://127.0.0.1:{}", proxy.tls_addrs[0].port()))
        .arg("--proxy-cacert")
        .arg(pki.ca_path("proxy-ca"))
        .arg("--cacert")
        .arg(&origin_ca)
        .arg(format!("https://{HOST}/hello"))
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        origin
            .wait_for("/hello", std::time::Duration::from_secs(5))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_checks_the_client_certificate_and_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "proxy-ca");
    let (cert, key) = pki.server_leaf("proxy");
    let clients = Pki::new(dir.path(), "client-ca");
    let allowed = clients.client_leaf("lab-1.clients.example.internal");
    let other = clients.client_leaf("lab-2.clients.example.internal");
    let stranger =
        Pki::new(dir.path(), "stranger-ca").client_leaf("lab-1.clients.example.internal");
    let origin = Origin::echo().await;
    let table = tls_table(&cert, &key, Some(&clients.ca_path("client-ca")));
    let proxy = proxy_with(table, vec!["lab-1.clients.example.internal"], &origin).await;
    let authority = format!("{HOST}:{}", origin.addr.port());

    let mut tls = tls_to_proxy(&proxy, &connector(&pki.ca_pem, Some(&allowed)))
        .await
        .unwrap();
    assert_eq!(connect_over(&mut tls, &authority).await.unwrap(), 200);

    let mut tls = tls_to_proxy(&proxy, &connector(&pki.ca_pem, Some(&other)))
        .await
        .unwrap();
    assert_eq!(
        connect_over(&mut tls, &authority).await.unwrap(),
        403,
        "name not in allow_cert_names"
    );

    for client in [None, Some(&stranger)] {
        let result = async {
            let mut tls = tls_to_proxy(&proxy, &connector(&pki.ca_pem, client)).await?;
            connect_over(&mut tls, &authority).await
        }
        .await;
        assert!(
            result.is_err(),
            "no certificate, or one from another CA, is refused: {result:?}"
        );
    }
    let failed = proxy
        .metric("portcullis_connections_rejected_total{reason=\"tls_handshake\"}")
        .await;
    assert_eq!(failed, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_the_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Pki::new(dir.path(), "old-ca");
    let new_ca = Pki::new(dir.path(), "new-ca");
    let (old_cert, old_key) = old_ca.server_leaf("old");
    let (new_cert, new_key) = new_ca.server_leaf("new");
    let origin = Origin::echo().await;
    let setup = Setup {
        proxy_tls: tls_table(&old_cert, &old_key, None),
        extra_rules: format!(
            "[[rule]]\nname = \"t\"\ndomains = [{HOST:?}]\nports = [\"{}\"]\n",
            origin.addr.port()
        ),
        ..Setup::default()
    };
    let proxy = start(setup.clone()).await;
    let trusts_new = connector(&new_ca.ca_pem, None);
    assert!(
        tls_to_proxy(&proxy, &trusts_new).await.is_err(),
        "still the old certificate"
    );

    let renewed = Setup {
        proxy_tls: tls_table(&new_cert, &new_key, None),
        ..setup
    };
    let text = renewed.to_toml(proxy.dns.addr);
    proxy
        .proxy
        .reload(Config::parse(&text, "renewed.toml").map_err(|e| e.to_string()))
        .unwrap();
    assert!(
        tls_to_proxy(&proxy, &trusts_new).await.is_ok(),
        "the renewed certificate"
    );
}

/// A balancer's PROXY header comes before the TLS handshake, often in the same segment as the
/// ClientHello; from an untrusted source it gets a plain-text 400 instead of a handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_comes_before_the_handshake() {
    use portcullis::net::proxy_protocol::sample::{v1, v2};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "proxy-ca");
    let (cert, key) = pki.server_leaf("proxy");
    let origin = Origin::echo().await;
    let setup = Setup {
        proxy_tls: tls_table(&cert, &key, None),
        proxy_protocol_trusted: vec!["127.0.0.1/32"],
        clients_allow: vec!["192.0.2.0/24"],
        extra_rules: format!(
            "[[rule]]\nname = \"t\"\ndomains = [{HOST:?}]\nports = [\"{}\"]\n",
            origin.addr.port()
        ),
        ..Setup::default()
    };
    let proxy = start(setup.clone()).await;
    proxy.dns.set(HOST, &["127.0.0.1".parse().unwrap()], 60);
    let to = proxy.tls_addrs[0];
    let connector = connector(&pki.ca_pem, None);
    let name = ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into());
    let authority = format!("{HOST}:{}", origin.addr.port());
    let mut tcp = TcpStream::connect(to).await.unwrap();
    tcp.write_all(&v2("192.0.2.50:4000".parse().unwrap(), to, &[]))
        .await
        .unwrap();
    let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
    assert_eq!(connect_over(&mut tls, &authority).await.unwrap(), 200);
    tls.write_all(b"behind a balancer").await.unwrap();
    let mut back = [0u8; 17];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"behind a balancer");
    // Without a header the balancer's own address is not allowed: refused before any TLS,
    // as every client the ACL turns away is.
    let tcp = TcpStream::connect(to).await.unwrap();
    assert!(connector.connect(name, tcp).await.is_err());

    let untrusted = Setup {
        proxy_protocol_trusted: vec![],
        clients_allow: vec!["0.0.0.0/0"],
        ..setup
    };
    let proxy = start(untrusted).await;
    let to = proxy.tls_addrs[0];
    let mut tcp = TcpStream::connect(to).await.unwrap();
    tcp.write_all(&v1("192.0.2.50:4000".parse().unwrap(), to))
        .await
        .unwrap();
    let reply = support::read_reply(&mut tcp).await;
    assert_eq!((reply.status, reply.reason()), (400, Some("bad_request")));
}
