//! Development certificates: a fleet CA, a core server certificate, an edge client certificate
//! (node id `edge-1`, more with `--edge ID`), and a server certificate for RTMPS/HTTPS from a
//! separate public CA, all for localhost. `livepop dev-certs DIR`.
//!
//! The public certificate never comes from the fleet CA: its key sits on every internet-facing
//! edge, and a fleet-signed server certificate could impersonate a core to the edges. An edge
//! certificate names its node id (SAN dNSName): the core checks the relay Hello against it.
//!
//! For development and tests only: production fleets use their own PKI (see README).
//! Also holds the PEM loading and rustls configuration shared by RTMPS and the QUIC relay.

use anyhow::{anyhow, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Files written by `generate`.
pub const FILES: [&str; 9] = [
    "ca.pem",
    "ca.key",
    "core.pem",
    "core.key",
    "edge.pem",
    "edge.key",
    "server.pem",
    "server.key",
    "public-ca.pem",
];

/// The node id the default development edge certificate names (the example edge's).
pub const DEV_EDGE_NODE: &str = "edge-1";
const FLEET_CA_NAME: &str = "livepop development fleet CA";

fn leaf(
    name: &str,
    dns: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String)> {
    let mut p = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())?;
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse()?));
    p.subject_alt_names.push(SanType::IpAddress("::1".parse()?));
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a new development CA and certificates into `dir`. Existing files are kept unless
/// `force`: configs that point at them keep working.
pub fn generate(dir: &Path, force: bool) -> Result<bool> {
    if !force && FILES.iter().all(|f| dir.join(f).is_file()) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let ca_pem = ca_params(FLEET_CA_NAME)?.self_signed(&ca_key)?.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params(FLEET_CA_NAME)?, ca_key);
    let (core, core_key) = leaf(
        "livepop core",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
        &issuer,
    )?;
    let (edge, edge_key) = leaf(
        "livepop edge",
        &[DEV_EDGE_NODE],
        ExtendedKeyUsagePurpose::ClientAuth,
        &issuer,
    )?;
    // The public CA signs the one server certificate and its key is thrown away.
    let public_key = KeyPair::generate()?;
    let public_params = ca_params("livepop development public CA")?;
    let public_pem = public_params.self_signed(&public_key)?.pem();
    let public = Issuer::new(public_params, public_key);
    let (server, server_key) = leaf(
        "livepop server",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
        &public,
    )?;
    for (name, body) in [
        ("ca.pem", &ca_pem),
        ("ca.key", &ca_key_pem),
        ("core.pem", &core),
        ("core.key", &core_key),
        ("edge.pem", &edge),
        ("edge.key", &edge_key),
        ("server.pem", &server),
        ("server.key", &server_key),
        ("public-ca.pem", &public_pem),
    ] {
        write_file(dir, name, body)?;
    }
    Ok(true)
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(ca)
}

/// Writes `node-ID.pem`/`.key` into `dir`: an edge client certificate for node `id`, signed by
/// the development fleet CA already there. Kept if present, unless `force`.
pub fn generate_edge(dir: &Path, id: &str, force: bool) -> Result<()> {
    if !crate::config::valid_node_id(id) {
        return Err(anyhow!(
            "node id {id:?}: lowercase DNS labels (a-z, 0-9, -) joined by dots"
        ));
    }
    let (pem, key) = (format!("node-{id}.pem"), format!("node-{id}.key"));
    if !force && dir.join(&pem).is_file() && dir.join(&key).is_file() {
        return Ok(());
    }
    let ca_key = std::fs::read_to_string(dir.join("ca.key"))
        .with_context(|| format!("reading {}", dir.join("ca.key").display()))?;
    // Same subject and key as the CA certificate: what a signature needs of its issuer.
    let issuer = Issuer::new(ca_params(FLEET_CA_NAME)?, KeyPair::from_pem(&ca_key)?);
    let (cert, cert_key) = leaf(
        "livepop edge",
        &[id],
        ExtendedKeyUsagePurpose::ClientAuth,
        &issuer,
    )?;
    write_file(dir, &pem, &cert)?;
    write_file(dir, &key, &cert_key)
}

fn write_file(dir: &Path, name: &str, body: &str) -> Result<()> {
    {
        let path = dir.join(name);
        // Private keys (the CA's above all) readable by the owner only, from creation on.
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
        }
        .with_context(|| format!("writing {}", path.display()))?;
        // `mode` applies only to a file created now: also narrow one left by an older version.
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("restricting {}", path.display()))?;
        }
        std::io::Write::write_all(&mut f, body.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// True if the certificate names `node_id` exactly as a SAN dNSName: the relay's proof of
/// identity. No wildcard, no other case or trailing dot: one spelling per node, so one
/// certificate is one identity (`config::valid_node_id`).
pub fn names_node(der: &CertificateDer<'_>, node_id: &str) -> bool {
    crate::config::valid_node_id(node_id)
        && webpki::EndEntityCert::try_from(der)
            .is_ok_and(|c| c.valid_dns_names().any(|n| n == node_id))
}

/// True if the certificate chain in `cert` verifies as a server certificate against the CA
/// certificates in `ca`. An edge refuses to present a fleet-signed certificate to the internet.
pub fn chains_to(cert: &Path, ca: &Path) -> Result<bool> {
    let chain = load_certs(cert)?;
    let cas = load_certs(ca)?;
    let anchors: Vec<_> = cas
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| anyhow!("{}: {e}", cert.display()))?;
    let provider = provider();
    Ok(ee
        .verify_for_usage(
            provider.signature_verification_algorithms.all,
            &anchors,
            &chain[1..],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .is_ok())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a PEM private key from {}", path.display()))
}

/// The crypto provider for every TLS stack in the process (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        store
            .add(c)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    Ok(store)
}

/// A TLS server config presenting `cert`/`key` (RTMPS and HTTPS), TLS 1.2 and 1.3.
pub fn server_config(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("certificate and key do not match")?;
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(c)
}

/// The core's relay TLS config: TLS 1.3, client certificates required and checked against `ca`.
pub fn relay_server_config(cert: &Path, key: &Path, ca: &Path) -> Result<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca)?),
        provider(),
    )
    .build()
    .context("building the client certificate verifier")?;
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("relay certificate and key do not match")?;
    c.alpn_protocols = vec![crate::relay::wire::ALPN.to_vec()];
    Ok(c)
}

/// The edge's relay TLS config: TLS 1.3, trusts `ca`, presents `cert`/`key`.
pub fn relay_client_config(cert: &Path, key: &Path, ca: &Path) -> Result<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .context("relay client certificate and key do not match")?;
    c.alpn_protocols = vec![crate::relay::wire::ALPN.to_vec()];
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_loadable_chain_and_keeps_existing() {
        let d = tempfile::tempdir().unwrap();
        assert!(generate(d.path(), false).unwrap());
        let before = std::fs::read(d.path().join("ca.pem")).unwrap();
        assert!(!generate(d.path(), false).unwrap());
        assert_eq!(before, std::fs::read(d.path().join("ca.pem")).unwrap());
        let p = d.path();
        relay_server_config(&p.join("core.pem"), &p.join("core.key"), &p.join("ca.pem")).unwrap();
        relay_client_config(&p.join("edge.pem"), &p.join("edge.key"), &p.join("ca.pem")).unwrap();
        server_config(&p.join("server.pem"), &p.join("server.key"), &[]).unwrap();
        assert!(server_config(&p.join("server.pem"), &p.join("edge.key"), &[]).is_err());
        // Edge certificates name their node; the public certificate is not from the fleet CA.
        let edge = &load_certs(&p.join("edge.pem")).unwrap()[0];
        assert!(names_node(edge, DEV_EDGE_NODE));
        for other in [
            "edge-2",
            "127.0.0.1",
            "localhost",
            "EDGE-1",
            "edge-1.",
            "Edge-1",
        ] {
            assert!(!names_node(edge, other), "{other}");
        }
        generate_edge(p, "edge-2", false).unwrap();
        let e2 = &load_certs(&p.join("node-edge-2.pem")).unwrap()[0];
        assert!(names_node(e2, "edge-2") && !names_node(e2, DEV_EDGE_NODE));
        relay_client_config(
            &p.join("node-edge-2.pem"),
            &p.join("node-edge-2.key"),
            &p.join("ca.pem"),
        )
        .unwrap();
        assert!(generate_edge(p, "../x", false).is_err());
        let fleet = roots(&p.join("ca.pem")).unwrap();
        let server = &load_certs(&p.join("server.pem")).unwrap()[0];
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(fleet),
            provider(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let now = rustls::pki_types::UnixTime::now();
        let localhost = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        assert!(verifier
            .verify_server_cert(server, &[], &localhost, &[], now)
            .is_err());
        assert!(!chains_to(&p.join("server.pem"), &p.join("ca.pem")).unwrap());
        assert!(chains_to(&p.join("server.pem"), &p.join("public-ca.pem")).unwrap());
        assert!(chains_to(&p.join("core.pem"), &p.join("ca.pem")).unwrap());
        let core = &load_certs(&p.join("core.pem")).unwrap()[0];
        assert!(verifier
            .verify_server_cert(core, &[], &localhost, &[], now)
            .is_ok());
        use std::os::unix::fs::PermissionsExt;
        for k in [
            "ca.key",
            "core.key",
            "edge.key",
            "server.key",
            "node-edge-2.key",
        ] {
            let mode = std::fs::metadata(p.join(k)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{k} is {mode:o}");
        }
        // `force` writes a new chain over the old one, keys still 0600.
        assert!(generate(p, true).unwrap());
        assert_ne!(before, std::fs::read(p.join("ca.pem")).unwrap());
        assert!(chains_to(&p.join("core.pem"), &p.join("ca.pem")).unwrap());
        let mode = std::fs::metadata(p.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
}
