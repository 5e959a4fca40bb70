//! Mutual TLS for replication links between the sites of one deployment.
//!
//! Trust model: every deployment has its own private certificate authority,
//! created once by [`create_deployment_pki`] in `<dir>/pki/` (`ca.pem`, and
//! `ca.key` with mode 0600). Each site gets a leaf certificate signed by that
//! CA, usable for both server and client authentication, in
//! `<site dir>/tls/{ca.pem,cert.pem,key.pem}` ([`TlsFiles`]). A site trusts
//! exactly its deployment's CA and nothing else — not the system roots, not
//! another deployment's CA — so a link can only be formed between two sites of
//! the same deployment, and both ends prove who they are:
//!
//! * the server ([`server_config`]) requires a client certificate chaining to
//!   the CA; a client without one, with a self-signed one or with one from
//!   another deployment is refused during the handshake;
//! * the client ([`client_config`]) checks that the server's certificate chains
//!   to the CA *and* is valid for the site it meant to reach ([`server_name`]);
//! * after the handshake either side learns which site the peer is with
//!   [`peer_site`], from the DNS name in the peer's verified certificate.
//!
//! A site name `s` appears in certificates as the DNS name `s.tidemark`
//! ([`DNS_SUFFIX`]): site names may be all digits (`"1"`), which is not a valid
//! DNS name on its own (it would read as an IP address); the suffix makes every
//! name `util::check_name` allows a valid one, and it is applied in exactly one
//! place, [`site_dns_name`].
//!
//! Only TLS 1.3 is offered, with the `aws-lc-rs` provider passed explicitly
//! (no process-wide default provider). Session resumption is off on both ends:
//! links are long-lived, and a full handshake on every connect means the
//! certificates are checked every time, not once per ticket lifetime.
//!
//! Certificates do not expire (rcgen's default validity runs to year 4096):
//! there is no rotation machinery yet, and a DR link that stops on a date
//! nobody remembers is worse than a long-lived key inside a private PKI. To
//! revoke a site, create a new deployment CA and reissue.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{verify_server_name, Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// DNS suffix appended to a site name to form the name in its certificate.
const DNS_SUFFIX: &str = "tidemark";

/// The DNS name (SAN) that stands for site `site` in certificates.
fn site_dns_name(site: &str) -> String {
    format!("{site}.{DNS_SUFFIX}")
}

/// The TLS files of one site: the deployment CA it trusts, its own
/// certificate (chain) and its private key, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Deployment CA certificate(s): the only trust anchors.
    pub ca: PathBuf,
    /// This site's certificate, leaf first.
    pub cert: PathBuf,
    /// This site's private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files under `site_dir/tls/`: `ca.pem`, `cert.pem`, `key.pem`.
    pub fn in_dir(site_dir: &Path) -> TlsFiles {
        let tls = site_dir.join("tls");
        TlsFiles { ca: tls.join("ca.pem"), cert: tls.join("cert.pem"), key: tls.join("key.pem") }
    }

    fn all_exist(&self) -> bool {
        self.ca.exists() && self.cert.exists() && self.key.exists()
    }
}

/// Creates (idempotently) the deployment CA in `dir/pki/{ca.pem,ca.key}` (key
/// mode 0600) and, for each site name, `dir/<site>/tls/{ca.pem,cert.pem,key.pem}`:
/// a leaf certificate signed by the CA whose SAN (DNS) is the site's name
/// (see [`server_name`]), usable for both server and client auth.
///
/// If the CA exists it is reused; existing site certificates are kept, after
/// checking that they still chain to this CA (an error names the files
/// otherwise — remove the site's `tls/` directory to reissue). A site whose
/// `tls/` is incomplete (e.g. a crash mid-issue) is issued afresh.
/// `deployment` goes into the CA's subject (CN "tidemark deployment <id>"); it
/// is ignored when the CA already exists.
pub fn create_deployment_pki(dir: &Path, deployment: &str, sites: &[String]) -> Result<()> {
    for site in sites {
        crate::util::check_name("site", site).map_err(anyhow::Error::msg)?;
        server_name(site)?;
    }
    ensure_dir(dir, 0o755)?;
    let pki = dir.join("pki");
    ensure_dir(&pki, 0o700)?;
    let (ca_pem, issuer) = load_or_create_ca(&pki, deployment)?;
    let ca_path = pki.join("ca.pem");
    let roots = Arc::new(
        root_store(&parse_certs(ca_pem.as_bytes(), &ca_path, "CA certificate")?, &ca_path)?,
    );

    for site in sites {
        let site_dir = dir.join(site);
        let files = TlsFiles::in_dir(&site_dir);
        if files.all_exist() {
            let site_ca = read_file(&files.ca, "CA certificate")?;
            if site_ca != ca_pem.as_bytes() {
                bail!(
                    "site {site}: {} is not the deployment CA {}; remove {} to reissue",
                    files.ca.display(),
                    ca_path.display(),
                    site_dir.join("tls").display()
                );
            }
            let chain = read_certs(&files.cert, "certificate")?;
            check_leaf(&roots, &chain, site).with_context(|| {
                format!(
                    "site {site}: TLS certificate {} is not valid under the deployment CA {}; remove {} to reissue",
                    files.cert.display(),
                    ca_path.display(),
                    site_dir.join("tls").display()
                )
            })?;
            continue;
        }
        ensure_dir(&site_dir, 0o755)?;
        ensure_dir(&site_dir.join("tls"), 0o700)?;
        let (cert_pem, key_pem) = issue_leaf(&issuer, site)?;
        // Check before writing: the new leaf must pass the same checks the
        // handshake applies (chain, usage, name), or the CA key and
        // certificate do not belong together.
        let chain = parse_certs(cert_pem.as_bytes(), &files.cert, "certificate")?;
        check_leaf(&roots, &chain, site).with_context(|| {
            format!(
                "site {site}: newly issued certificate does not verify under {} (does {} belong to it?)",
                ca_path.display(),
                pki.join("ca.key").display()
            )
        })?;
        crate::crashsafe::write_file_mode(&files.key, key_pem.as_bytes(), 0o600)?;
        crate::crashsafe::write_file_mode(&files.cert, cert_pem.as_bytes(), 0o644)?;
        crate::crashsafe::write_file_mode(&files.ca, ca_pem.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Loads `pki/{ca.pem,ca.key}`, or creates them if `ca.pem` is absent.
/// `ca.pem` is written last, so its presence marks a complete CA.
fn load_or_create_ca(pki: &Path, deployment: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let cert_path = pki.join("ca.pem");
    let key_path = pki.join("ca.key");
    if cert_path.exists() {
        if !key_path.exists() {
            bail!(
                "deployment CA {} exists but its key {} is missing",
                cert_path.display(),
                key_path.display()
            );
        }
        let cert_pem = read_string(&cert_path, "CA certificate")?;
        let key_pem = read_string(&key_path, "CA key")?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("failed to parse TLS CA key {}", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("failed to parse TLS CA certificate {}", cert_path.display()))?;
        return Ok((cert_pem, issuer));
    }

    let key = KeyPair::generate().context("failed to generate the deployment CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "tidemark");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("tidemark deployment {deployment}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).context("failed to self-sign the deployment CA")?;
    let cert_pem = cert.pem();
    crate::crashsafe::write_file_mode(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    crate::crashsafe::write_file_mode(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok((cert_pem, Issuer::new(params, key)))
}

/// Issues a leaf certificate for `site`; returns `(cert_pem, key_pem)`.
fn issue_leaf(issuer: &Issuer<'_, KeyPair>, site: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().with_context(|| format!("failed to generate a key for site {site}"))?;
    let mut params = CertificateParams::new(vec![site_dns_name(site)])
        .with_context(|| format!("site name {site:?} cannot be used in a certificate"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "tidemark");
    params.distinguished_name.push(DnType::CommonName, format!("tidemark site {site}"));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("failed to sign the certificate of site {site}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Checks that `chain` (leaf first) verifies under `roots` as both a client
/// and a server certificate for `site` — the checks a handshake applies.
fn check_leaf(roots: &Arc<RootCertStore>, chain: &[CertificateDer<'static>], site: &str) -> Result<()> {
    let (leaf, intermediates) = chain.split_first().context("empty certificate chain")?;
    let now = UnixTime::now();
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .context("failed to build client certificate verifier")?
        .verify_client_cert(leaf, intermediates, now)
        .context("not valid as a client certificate")?;
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .context("failed to build server certificate verifier")?
        .verify_server_cert(leaf, intermediates, &server_name(site)?, &[], now)
        .context("not valid as a server certificate")?;
    Ok(())
}

/// TLS 1.3-only server config that REQUIRES a client certificate chaining to
/// the CA in `files.ca`, and presents `files.cert`/`files.key`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>> {
    server_config_with(files, provider())
}

fn server_config_with(files: &TlsFiles, provider: Arc<CryptoProvider>) -> Result<Arc<ServerConfig>> {
    let roots = Arc::new(root_store(&read_certs(&files.ca, "CA certificate")?, &files.ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .with_context(|| format!("failed to build client verifier from {}", files.ca.display()))?;
    let (chain, key) = read_identity(files)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the crypto provider does not support TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "TLS key {} does not fit certificate {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// TLS 1.3-only client config presenting `files.cert`/`files.key`, trusting
/// only `files.ca`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>> {
    client_config_with(files, provider())
}

fn client_config_with(files: &TlsFiles, provider: Arc<CryptoProvider>) -> Result<Arc<ClientConfig>> {
    let roots = root_store(&read_certs(&files.ca, "CA certificate")?, &files.ca)?;
    let (chain, key) = read_identity(files)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the crypto provider does not support TLS 1.3")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .with_context(|| {
            format!(
                "TLS key {} does not fit certificate {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Which of `candidates` the peer's (already verified) end-entity certificate
/// is valid for (SAN DNS name), given the peer certificates from a completed
/// handshake (`conn.peer_certificates()`).
///
/// Returns `None` if there is no certificate, it does not parse, no candidate
/// matches, or more than one does (names compare case-insensitively, as in the
/// handshake, so `"a"` and `"A"` are ambiguous): unknown is never guessed.
pub fn peer_site(
    peer_certs: Option<&[CertificateDer<'static>]>,
    candidates: &[String],
) -> Option<String> {
    let leaf = peer_certs?.first()?;
    let parsed = ParsedCertificate::try_from(leaf).ok()?;
    let mut found = None;
    for candidate in candidates {
        let Ok(name) = server_name(candidate) else { continue };
        if verify_server_name(&parsed, &name).is_ok() {
            if found.is_some() {
                return None;
            }
            found = Some(candidate.clone());
        }
    }
    found
}

/// ServerName to use when connecting to site `name` (`<name>.tidemark`).
pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    let dns = site_dns_name(name);
    ServerName::try_from(dns.clone())
        .map_err(|e| anyhow::anyhow!("site name {name:?} cannot be used as TLS name {dns:?}: {e}"))
}

/// aws-lc-rs' provider with AES-128-GCM first. Every replicated byte is
/// encrypted once at the primary and decrypted once at the DR site, both on
/// the busy path, so the cipher's cost per byte counts:
/// * aws-lc-rs over ring: its AES-GCM uses the AVX-512 VAES code where the
///   CPU has it; 9.3 vs 5.8 GB/s sealing 16 KiB records on the bench machine,
///   and ~5% more seqwrite throughput with a tmpfs DR (BENCHMARKS.md
///   "Crypto provider").
/// * AES-128-GCM over AES-256-GCM: 10 rounds instead of 14, ~25% cheaper.
///   AES-256-GCM and ChaCha20-Poly1305 stay acceptable, so a peer that
///   prefers them still connects (the server follows the client's order).
///
/// Key exchange is aws-lc-rs' default: X25519MLKEM768 (post-quantum hybrid)
/// where both ends have it, X25519 and the NIST curves otherwise; a site
/// built with ring offers X25519 first and still links up. See
/// ARCHITECTURE.md "Link security".
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    Arc::new(CryptoProvider {
        cipher_suites: vec![cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256],
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("failed to read TLS {what} {}", path.display()))
}

fn read_string(path: &Path, what: &str) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("failed to read TLS {what} {}", path.display()))
}

/// Parses every certificate in PEM `data` (from `path`); at least one.
fn parse_certs(data: &[u8], path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("failed to parse TLS {what} {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in TLS {what} {}", path.display());
    }
    Ok(certs)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    parse_certs(&read_file(path, what)?, path, what)
}

fn root_store(certs: &[CertificateDer<'static>], path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.clone())
            .with_context(|| format!("TLS CA certificate {} is not a usable trust anchor", path.display()))?;
    }
    Ok(roots)
}

fn read_identity(files: &TlsFiles) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = read_certs(&files.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&read_file(&files.key, "key")?)
        .with_context(|| format!("failed to parse TLS key {}", files.key.display()))?;
    Ok((chain, key))
}

/// Creates `dir` with `mode` if it is missing (parents as needed) and makes
/// the new entry durable. An existing directory keeps its mode.
fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure_dir(parent, 0o755)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("failed to create directory {}", dir.display())),
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => crate::crashsafe::fsync_dir(parent),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn names(sites: &[&str]) -> Vec<String> {
        sites.iter().map(|s| s.to_string()).collect()
    }

    type ServerSide = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>;
    type ClientSide = std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>;

    /// One handshake over loopback TCP; returns both ends' results.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        target: &str,
    ) -> (ServerSide, ClientSide) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsAcceptor::from(server).accept(tcp).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let client_side = tokio::time::timeout(
            TIMEOUT,
            TlsConnector::from(client).connect(server_name(target).unwrap(), tcp),
        )
        .await
        .expect("client handshake timed out");
        let server_side = tokio::time::timeout(TIMEOUT, accept)
            .await
            .expect("server handshake timed out")
            .unwrap();
        (server_side, client_side)
    }

    /// Asserts the handshake end failed, for the expected reason.
    fn assert_refused<T>(side: &std::io::Result<T>, reason: &str, what: &str) {
        match side {
            Ok(_) => panic!("{what}: handshake succeeded"),
            Err(e) => assert!(format!("{e:?}").contains(reason), "{what}: expected {reason}, got {e:?}"),
        }
    }

    async fn connect_sites(dir: &Path, server: &str, client: &str) -> (ServerSide, ClientSide) {
        let s = server_config(&TlsFiles::in_dir(&dir.join(server))).unwrap();
        let c = client_config(&TlsFiles::in_dir(&dir.join(client))).unwrap();
        handshake(s, c, server).await
    }

    #[tokio::test]
    async fn tls_same_deployment_both_ways_identifies_peers_and_carries_data() {
        let dir = tempfile::tempdir().unwrap();
        let sites = names(&["a", "b", "1"]);
        create_deployment_pki(dir.path(), "d1", &sites).unwrap();
        for (srv, cli) in [("a", "b"), ("b", "a"), ("1", "a"), ("a", "1")] {
            let (server, client) = connect_sites(dir.path(), srv, cli).await;
            let mut server = server.unwrap_or_else(|e| panic!("{srv}<-{cli}: server: {e}"));
            let mut client = client.unwrap_or_else(|e| panic!("{srv}<-{cli}: client: {e}"));
            assert_eq!(peer_site(server.get_ref().1.peer_certificates(), &sites).as_deref(), Some(cli));
            assert_eq!(peer_site(client.get_ref().1.peer_certificates(), &sites).as_deref(), Some(srv));

            let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
            client.write_all(&payload).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0u8; payload.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, payload);
            server.write_all(b"ack").await.unwrap();
            server.flush().await.unwrap();
            let mut ack = [0u8; 3];
            client.read_exact(&mut ack).await.unwrap();
            assert_eq!(&ack, b"ack");
        }
    }

    #[tokio::test]
    async fn tls_client_refuses_server_of_the_wrong_site() {
        let dir = tempfile::tempdir().unwrap();
        create_deployment_pki(dir.path(), "d1", &names(&["a", "b", "c"])).unwrap();
        let s = server_config(&TlsFiles::in_dir(&dir.path().join("a"))).unwrap();
        let c = client_config(&TlsFiles::in_dir(&dir.path().join("b"))).unwrap();
        // b means to reach c but a answers: a's certificate is not valid for c.
        let (server, client) = handshake(s, c, "c").await;
        assert_refused(&client, "NotValidForName", "client reaching c but meeting a");
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn tls_plain_tcp_garbage_is_an_accept_error() {
        let dir = tempfile::tempdir().unwrap();
        create_deployment_pki(dir.path(), "d1", &names(&["a"])).unwrap();
        let s = server_config(&TlsFiles::in_dir(&dir.path().join("a"))).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsAcceptor::from(s).accept(tcp).await
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\x00\xff\x13\x37garbage").await.unwrap();
        tcp.shutdown().await.unwrap();
        let result = tokio::time::timeout(TIMEOUT, accept).await.unwrap().unwrap();
        assert_refused(&result, "InvalidMessage", "server vs plain TCP garbage");
    }

    #[tokio::test]
    async fn tls_self_signed_client_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        create_deployment_pki(dir.path(), "d1", &names(&["a", "b"])).unwrap();
        // A client that trusts the real CA but presents a self-signed
        // certificate claiming to be site b.
        let rogue = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_dir(rogue.path());
        fs::create_dir_all(files.ca.parent().unwrap()).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec![site_dns_name("b")]).unwrap();
        fs::write(&files.cert, ck.cert.pem()).unwrap();
        fs::write(&files.key, ck.signing_key.serialize_pem()).unwrap();
        fs::copy(dir.path().join("pki/ca.pem"), &files.ca).unwrap();

        let s = server_config(&TlsFiles::in_dir(&dir.path().join("a"))).unwrap();
        let (server, _client) = handshake(s.clone(), client_config(&files).unwrap(), "a").await;
        assert_refused(&server, "UnknownIssuer", "server vs self-signed client");

        // A client presenting no certificate at all.
        let roots = root_store(&read_certs(&files.ca, "CA certificate").unwrap(), &files.ca).unwrap();
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (server, _client) = handshake(s, Arc::new(anonymous), "a").await;
        assert_refused(&server, "NoCertificatesPresented", "server vs anonymous client");
    }

    #[tokio::test]
    async fn tls_other_deployment_is_refused_both_ways() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let sites = names(&["a", "b"]);
        create_deployment_pki(d1.path(), "d1", &sites).unwrap();
        create_deployment_pki(d2.path(), "d2", &sites).unwrap();
        let files = |d: &tempfile::TempDir, s: &str| TlsFiles::in_dir(&d.path().join(s));

        // Client from deployment 2 (with a CA-signed cert for the same name)
        // against a server of deployment 1: the server refuses it.
        let mut mixed = files(&d2, "b");
        mixed.ca = files(&d1, "b").ca; // trusts d1 so only the server's check can fail
        let (server, _) =
            handshake(server_config(&files(&d1, "a")).unwrap(), client_config(&mixed).unwrap(), "a").await;
        assert_refused(&server, "UnknownIssuer", "d1 server vs d2 client");

        // Client of deployment 1 against a server of deployment 2: the client refuses.
        let mut mixed = files(&d2, "a");
        mixed.ca = files(&d1, "a").ca; // server trusts d1's clients, so only the client's check can fail
        let (server, client) =
            handshake(server_config(&mixed).unwrap(), client_config(&files(&d1, "b")).unwrap(), "a").await;
        assert_refused(&client, "UnknownIssuer", "d1 client vs d2 server");
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn tls_pki_is_idempotent_and_later_sites_share_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        create_deployment_pki(d, "d1", &names(&["a", "b"])).unwrap();
        let files = [
            "pki/ca.pem", "pki/ca.key", "a/tls/ca.pem", "a/tls/cert.pem", "a/tls/key.pem",
            "b/tls/ca.pem", "b/tls/cert.pem", "b/tls/key.pem",
        ];
        let snapshot = || files.iter().map(|f| fs::read(d.join(f)).unwrap()).collect::<Vec<_>>();
        let before = snapshot();
        for f in ["pki/ca.key", "a/tls/key.pem", "b/tls/key.pem"] {
            let mode = fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }

        create_deployment_pki(d, "d1", &names(&["a", "b"])).unwrap();
        assert_eq!(snapshot(), before);

        create_deployment_pki(d, "d1", &names(&["a", "b", "c"])).unwrap();
        assert_eq!(snapshot(), before);
        assert_eq!(fs::read(d.join("c/tls/ca.pem")).unwrap(), fs::read(d.join("pki/ca.pem")).unwrap());
        assert_eq!(fs::metadata(d.join("c/tls/key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
        let (server, client) = connect_sites(d, "a", "c").await;
        let sites = names(&["a", "b", "c"]);
        assert_eq!(peer_site(server.unwrap().get_ref().1.peer_certificates(), &sites).as_deref(), Some("c"));
        assert_eq!(peer_site(client.unwrap().get_ref().1.peer_certificates(), &sites).as_deref(), Some("a"));

        // A site whose certificate comes from another CA is refused loudly, not kept silently.
        let other = tempfile::tempdir().unwrap();
        create_deployment_pki(other.path(), "d2", &names(&["b"])).unwrap();
        fs::copy(other.path().join("b/tls/ca.pem"), d.join("b/tls/ca.pem")).unwrap();
        let err = format!("{:#}", create_deployment_pki(d, "d1", &names(&["b"])).unwrap_err());
        assert!(err.contains("b/tls/ca.pem"), "{err}");
    }

    #[tokio::test]
    async fn tls_negotiates_tls13() {
        let dir = tempfile::tempdir().unwrap();
        create_deployment_pki(dir.path(), "d1", &names(&["a", "b"])).unwrap();
        let (server, client) = connect_sites(dir.path(), "a", "b").await;
        let (server, client) = (server.unwrap(), client.unwrap());
        assert_eq!(server.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(client.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        for suite in [server.get_ref().1.negotiated_cipher_suite(), client.get_ref().1.negotiated_cipher_suite()] {
            assert_eq!(suite.map(|s| s.suite()), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        }
        // Post-quantum hybrid key exchange between two sites of this build.
        for kx in [server.get_ref().1.negotiated_key_exchange_group(), client.get_ref().1.negotiated_key_exchange_group()] {
            assert_eq!(kx.map(|k| k.name()), Some(rustls::NamedGroup::X25519MLKEM768));
        }
    }

    #[tokio::test]
    async fn tls_connects_with_a_peer_that_prefers_another_cipher() {
        // A site built before AES-128-GCM went first (ring's default order:
        // AES-256-GCM first, no post-quantum key exchange) still links up, both ways; the client's order
        // decides.
        use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
        let dir = tempfile::tempdir().unwrap();
        create_deployment_pki(dir.path(), "d1", &names(&["a", "b"])).unwrap();
        let files = |s: &str| TlsFiles::in_dir(&dir.path().join(s));
        // What such a site offered: ring's default suites and key exchange
        // groups, in ring's order (built here from aws-lc-rs, which has them
        // all).
        let old = || {
            use rustls::crypto::aws_lc_rs::{cipher_suite as cs, kx_group as kx};
            Arc::new(rustls::crypto::CryptoProvider {
                cipher_suites: vec![cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_CHACHA20_POLY1305_SHA256],
                kx_groups: vec![kx::X25519, kx::SECP256R1, kx::SECP384R1],
                ..rustls::crypto::aws_lc_rs::default_provider()
            })
        };
        for (server, client, want) in [
            (server_config(&files("a")).unwrap(), client_config_with(&files("b"), old()).unwrap(), TLS13_AES_256_GCM_SHA384),
            (server_config_with(&files("a"), old()).unwrap(), client_config(&files("b")).unwrap(), TLS13_AES_128_GCM_SHA256),
        ] {
            let (s, c) = handshake(server, client, "a").await;
            let (s, c) = (s.unwrap(), c.unwrap());
            assert_eq!(s.get_ref().1.negotiated_cipher_suite().map(|x| x.suite()), Some(want));
            assert_eq!(c.get_ref().1.negotiated_cipher_suite().map(|x| x.suite()), Some(want));
            assert_eq!(s.get_ref().1.negotiated_key_exchange_group().map(|k| k.name()), Some(rustls::NamedGroup::X25519));
        }
    }

    #[test]
    fn tls_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_dir(dir.path());
        let err = format!("{:#}", client_config(&files).unwrap_err());
        assert!(err.contains(&format!("failed to read TLS CA certificate {}", files.ca.display())), "{err}");

        create_deployment_pki(dir.path(), "d1", &names(&["a"])).unwrap();
        let mut files = TlsFiles::in_dir(&dir.path().join("a"));
        files.cert = dir.path().join("missing.pem");
        let err = format!("{:#}", server_config(&files).unwrap_err());
        assert!(err.contains(&format!("failed to read TLS certificate {}", files.cert.display())), "{err}");

        fs::write(&files.cert, "not pem").unwrap();
        let err = format!("{:#}", server_config(&files).unwrap_err());
        assert!(err.contains(&files.cert.display().to_string()), "{err}");
    }

    #[test]
    fn tls_names() {
        assert!(server_name("a").is_ok());
        assert!(server_name("1").is_ok());
        assert!(server_name("dc_1.east").is_ok());
        assert!(server_name("a..b").is_err());
        assert_eq!(peer_site(None, &names(&["a"])), None);
        assert!(create_deployment_pki(Path::new("/nonexistent-unused"), "d", &names(&["../x"])).is_err());
    }
}
