//! The built-in certificate authority (ID-1): a root kept in a directory, leaf certificates
//! issued per workload identity.
//!
//! The directory uses Istio's plug-in CA layout (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
//! `cert-chain.pem`), so an existing Istio CA can be dropped in, and several node proxies given
//! the same directory share one trust root. Creation is serialised with a file lock, so
//! proxies starting together still agree on a single root.

use std::{
    fs::{self, File, OpenOptions},
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::{BoxFuture, CertificateProvider, Identity, IdentityError, IssuedCert};

const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const ROOT_CERT: &str = "root-cert.pem";
const CERT_CHAIN: &str = "cert-chain.pem";
/// Issued certificates start a little in the past so that peers with slightly slow clocks
/// accept them at once.
const BACKDATE: Duration = Duration::from_secs(60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A CA that signs workload certificates with a key it holds.
pub struct LocalCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate followed by its chain up to the root (`cert-chain.pem`).
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    dir: PathBuf,
}

impl LocalCa {
    /// Loads the CA from `dir`, creating a new self-signed root there if it holds none.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, IdentityError> {
        let err = |reason: String| IdentityError::CaDirectory { dir: dir.display().to_string(), reason };
        fs::create_dir_all(dir).map_err(|e| err(format!("cannot create it: {e}")))?;
        // A read-only directory (a mounted Secret, as in deploy/) is one nobody is writing: the
        // lock only keeps two processes from creating the CA at once.
        let _lock = match DirLock::acquire(dir) {
            Ok(lock) => Some(lock),
            Err(e) if e.raw_os_error() == Some(libc::EROFS) && dir.join(CA_KEY).exists() => None,
            Err(e) => return Err(err(format!("cannot lock it: {e}"))),
        };
        if !dir.join(CA_KEY).exists() {
            create_root(dir, trust_domain).map_err(err)?;
        }
        let read = |name: &str| fs::read_to_string(dir.join(name)).map_err(|e| err(format!("cannot read {name}: {e}")));
        let key = KeyPair::from_pem(&read(CA_KEY)?).map_err(|e| err(format!("{CA_KEY} is not a usable key: {e}")))?;
        let ca_cert_pem = read(CA_CERT)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, key).map_err(|e| err(format!("{CA_CERT}: {e}")))?;
        let chain_pem = if dir.join(CERT_CHAIN).exists() { read(CERT_CHAIN)? } else { ca_cert_pem.clone() };
        let root_pem = if dir.join(ROOT_CERT).exists() { read(ROOT_CERT)? } else { ca_cert_pem };
        let chain = parse_certs(&chain_pem).map_err(|e| err(format!("{CERT_CHAIN}: {e}")))?;
        let roots = parse_certs(&root_pem).map_err(|e| err(format!("{ROOT_CERT}: {e}")))?;
        Ok(Self { trust_domain: trust_domain.to_owned(), issuer, chain, roots, dir: dir.to_path_buf() })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificates peers must chain to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Path of the root certificate file, for handing to other proxies (`--ca-root`).
    pub fn root_cert_path(&self) -> PathBuf {
        self.dir.join(ROOT_CERT)
    }

    /// Issues a certificate and a fresh ECDSA P-256 key for `identity`.
    pub fn issue_local(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, IdentityError> {
        self.issue_with_key(identity, None, ttl)
    }

    /// A fresh key and its certificate for `identity`, naming `node` when given.
    fn issue_with_key(
        &self,
        identity: &Identity,
        node: Option<&str>,
        ttl: Duration,
    ) -> Result<IssuedCert, IdentityError> {
        let fail = |reason: String| IdentityError::Issue { identity: identity.to_string(), reason };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let (leaf, not_before, not_after, serial) = self.sign(identity, node, ttl, &key).map_err(fail)?;
        Ok(IssuedCert {
            identity: identity.clone(),
            chain: self.full_chain(leaf),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots: self.roots.clone(),
            not_before,
            not_after,
            received: SystemTime::now(),
            serial,
        })
    }

    /// Signs a CSR (PEM) for `identity`. Only the CSR's public key is used: the identity, the
    /// validity and the usages are the CA's decision, never the requester's. With `node`, the
    /// certificate also names the node its holder serves (a node proxy's certificate, see
    /// `caller`). Returns the chain in PEM, leaf first, as Istio's CA API answers.
    pub fn sign_csr_for(
        &self,
        csr_pem: &str,
        identity: &Identity,
        node: Option<&str>,
        ttl: Duration,
    ) -> Result<Vec<String>, IdentityError> {
        let fail = |reason: String| IdentityError::Issue { identity: identity.to_string(), reason };
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| fail(format!("bad CSR: {e}")))?;
        let (leaf, ..) = self.sign(identity, node, ttl, &csr.public_key).map_err(fail)?;
        Ok(self.full_chain(leaf).iter().map(|c| to_pem(c)).collect())
    }

    /// A node proxy's certificate and a fresh key, naming `node` (see `caller`).
    pub fn issue_for_node(&self, identity: &Identity, node: &str, ttl: Duration) -> Result<IssuedCert, IdentityError> {
        self.issue_with_key(identity, Some(node), ttl)
    }

    /// Issues a TLS server certificate and a fresh ECDSA P-256 key for one of strait's own
    /// endpoints (the CA API): DNS and IP names, no SPIFFE identity, so no workload can pass it
    /// off as a peer and no CA endpoint certificate is mistaken for a workload's.
    pub fn issue_server_cert(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>), IdentityError> {
        let fail = |reason: String| IdentityError::Issue { identity: dns_names.join(","), reason };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            name.push(DnType::CommonName, *first);
        }
        params.distinguished_name = name;
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
        for dns in dns_names {
            let dns = (*dns).try_into().map_err(|e| fail(format!("`{dns}` is not a DNS name: {e}")))?;
            sans.push(SanType::DnsName(dns));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(SerialNumber::from_slice(&random_serial().map_err(fail)?));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| fail(e.to_string()))?;
        Ok((self.full_chain(cert.der().clone()), PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    fn sign(
        &self,
        identity: &Identity,
        node: Option<&str>,
        ttl: Duration,
        public_key: &impl PublicKeyData,
    ) -> Result<(CertificateDer<'static>, SystemTime, SystemTime, String), String> {
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = now + ttl;
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        // Istio's workload certificates: empty subject, the SPIFFE URI as the only name. A node
        // proxy's also names its node in the subject, as Kubernetes names nodes.
        let mut subject = DistinguishedName::new();
        if let Some(node) = node {
            subject.push(DnType::OrganizationName, super::caller::NODE_ORGANIZATION);
            subject.push(DnType::CommonName, format!("{}{node}", super::caller::NODE_COMMON_NAME_PREFIX));
        }
        params.distinguished_name = subject;
        let uri = identity.to_string().try_into().map_err(|e| format!("identity is not a valid URI: {e}"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer).map_err(|e| e.to_string())?;
        let hex = serial.iter().map(|b| format!("{b:02x}")).collect();
        Ok((cert.der().clone(), not_before, not_after, hex))
    }

    fn full_chain(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = vec![leaf];
        // A self-signed root signs directly: the chain file is the root itself, which peers
        // already hold, so it is not sent.
        if self.chain != self.roots {
            chain.extend(self.chain.iter().cloned());
        }
        chain
    }
}

impl CertificateProvider for LocalCa {
    fn issue<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> BoxFuture<'a, Result<IssuedCert, IdentityError>> {
        Box::pin(async move { self.issue_local(identity, ttl) })
    }
}

fn create_root(dir: &Path, trust_domain: &str) -> Result<(), String> {
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| format!("cannot generate the root key: {e}"))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, trust_domain);
    name.push(DnType::CommonName, "strait root CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the root: {e}"))?;
    let pem = cert.pem();
    for name in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
        write_new(&dir.join(name), &pem, 0o644)?;
    }
    // The key last: its presence is what marks the directory as complete.
    write_new(&dir.join(CA_KEY), &key.serialize_pem(), 0o600)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn random_serial() -> Result<[u8; 16], String> {
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| "no randomness available".to_owned())?;
    // Positive and non-zero leading byte, as DER integers for serials should be.
    serial[0] = (serial[0] & 0x7f) | 0x01;
    Ok(serial)
}

pub(crate) fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let certs = certs.map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

pub(crate) fn to_pem(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

/// An exclusive `flock` on `<dir>/.lock`, released on drop.
struct DirLock(File);

impl DirLock {
    fn acquire(dir: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(".lock"))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("strait-ca-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn issues_spiffe_only_p256_leaves_and_shares_the_root() {
        let dir = temp_dir("issue");
        let ca = LocalCa::load_or_create(&dir, "cluster.local").expect("create");
        let again = LocalCa::load_or_create(&dir, "cluster.local").expect("load");
        assert_eq!(ca.roots(), again.roots(), "a second proxy on the same directory shares the root");
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let cert = ca.issue_local(&id, Duration::from_secs(3600)).expect("issue");
        assert_eq!(cert.chain.len(), 1);
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.chain[0]).expect("parse");
        assert!(x509.subject().iter().next().is_none(), "empty subject");
        let san = x509.subject_alternative_name().expect("ext").expect("san");
        let names: Vec<String> = san.value.general_names.iter().map(|n| format!("{n:?}")).collect();
        assert_eq!(names, [format!("URI(\"{id}\")")]);
        assert!(cert.refresh_at() < cert.not_after && cert.refresh_at() > SystemTime::now());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn csr_identity_is_the_cas_choice() {
        let dir = temp_dir("csr");
        let ca = LocalCa::load_or_create(&dir, "cluster.local").expect("create");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let chain = ca.sign_csr_for(&csr, &id, None, Duration::from_secs(60)).expect("sign");
        let der = parse_certs(&chain[0]).expect("pem");
        let (_, x509) = x509_parser::parse_x509_certificate(&der[0]).expect("parse");
        let san = x509.subject_alternative_name().expect("ext").expect("san");
        assert_eq!(san.value.general_names.len(), 1, "the requested DNS name is dropped");
        let _ = fs::remove_dir_all(&dir);
    }
}
