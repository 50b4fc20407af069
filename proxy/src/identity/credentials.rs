//! TLS credentials that users supply (GW-2): a certificate chain, its key and a CA, from file
//! paths (`serverCertificate`, `privateKey`, `caCertificates`; `clientCertificate` on the
//! client side) or a named credential (`credentialName`) in a directory laid out like the
//! Kubernetes secrets Istio reads:
//!
//! ```text
//! DIR/<name>/tls.crt            certificate chain (PEM)
//! DIR/<name>/tls.key            private key (PEM: PKCS#8, PKCS#1 or SEC1)
//! DIR/<name>/ca.crt             CA for client certificates (MUTUAL), optional
//! DIR/<name>-cacert/ca.crt      the same CA kept apart, Istio's `<name>-cacert` secret; wins
//! ```
//!
//! Loaded on first use and cached; the files are looked at again (metadata only) at most every
//! `RECHECK`, and read again when one changed, so a certificate rotated on disk is used by new
//! handshakes about half a second later, without a restart; open connections keep theirs. A
//! file that fails to load keeps the last good credential.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};
use tracing::warn;

/// How often cached files are checked for changes. A `stat` per file per interval, only when a
/// handshake asks: cheap, and well within the 2 s GW-2 allows for a rotation to take effect.
const RECHECK: Duration = Duration::from_millis(500);

/// Where a credential comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CredentialSource {
    Files {
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    },
    /// `credentialName`, looked up in the credentials directory.
    Named(String),
}

/// A loaded credential.
#[derive(Debug)]
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    /// The chain with its signing key, ready for rustls; `None` when only a CA was given.
    pub key: Option<Arc<CertifiedKey>>,
    /// The CA's certificates, when a CA was given.
    pub roots: Option<Arc<RootCertStore>>,
}

/// The credentials in use, cached.
pub struct Credentials {
    dir: Option<PathBuf>,
    cache: Mutex<HashMap<CredentialSource, Cached>>,
}

struct Cached {
    credential: Arc<Credential>,
    /// The files read and what they looked like then.
    stamps: Vec<(PathBuf, Option<Stamp>)>,
    checked: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).ok()?;
    Some(Stamp { modified: meta.modified().ok(), len: meta.len(), inode: meta.ino() })
}

impl Credentials {
    /// `dir`: where named credentials are (`--credentials`); `None`: only file paths work.
    pub fn new(dir: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self { dir, cache: Mutex::default() })
    }

    /// The credential of `source`, from the cache when its files did not change. The error
    /// names the file and what is wrong with it.
    pub fn get(&self, source: &CredentialSource) -> Result<Arc<Credential>, String> {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cached) = cache.get_mut(source) {
            if cached.checked.elapsed() < RECHECK {
                return Ok(cached.credential.clone());
            }
            cached.checked = Instant::now();
            if cached.stamps.iter().all(|(path, was)| stamp(path) == *was) {
                return Ok(cached.credential.clone());
            }
            return match self.load(source) {
                Ok((credential, stamps)) => {
                    cached.credential = Arc::new(credential);
                    cached.stamps = stamps;
                    Ok(cached.credential.clone())
                }
                Err(e) => {
                    // Keep serving with the last good one; look again after RECHECK.
                    warn!("cannot reload the TLS credential, keeping the previous one: {e}");
                    cached.stamps = cached.stamps.iter().map(|(p, _)| (p.clone(), stamp(p))).collect();
                    Ok(cached.credential.clone())
                }
            };
        }
        let (credential, stamps) = self.load(source)?;
        let credential = Arc::new(credential);
        cache.insert(source.clone(), Cached { credential: credential.clone(), stamps, checked: Instant::now() });
        Ok(credential)
    }

    /// The files of `source`: certificate, key, CA (each optional).
    fn paths(&self, source: &CredentialSource) -> Result<[Option<PathBuf>; 3], String> {
        match source {
            CredentialSource::Files { cert, key, ca } => Ok([cert.clone(), key.clone(), ca.clone()]),
            CredentialSource::Named(name) => {
                let Some(dir) = &self.dir else {
                    return Err(format!("credentialName `{name}` needs a credentials directory (--credentials DIR)"));
                };
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    return Err(format!("credentialName `{name}` is not a valid name"));
                }
                let own = dir.join(name);
                let separate_ca = dir.join(format!("{name}-cacert")).join("ca.crt");
                let ca = if separate_ca.exists() { separate_ca } else { own.join("ca.crt") };
                Ok([Some(own.join("tls.crt")), Some(own.join("tls.key")), ca.exists().then_some(ca)])
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn load(&self, source: &CredentialSource) -> Result<(Credential, Vec<(PathBuf, Option<Stamp>)>), String> {
        let [cert, key, ca] = self.paths(source)?;
        let mut stamps = Vec::new();
        // Stamped before reading: a change during the read is seen at the next check.
        for path in [&cert, &key, &ca].into_iter().flatten() {
            stamps.push((path.clone(), stamp(path)));
        }
        if let CredentialSource::Named(name) = source
            && let Some(dir) = &self.dir
        {
            // A CA added later as `<name>-cacert` is noticed too.
            let separate = dir.join(format!("{name}-cacert")).join("ca.crt");
            if ca.as_ref() != Some(&separate) {
                stamps.push((separate.clone(), stamp(&separate)));
            }
        }
        let chain = match &cert {
            Some(path) => read_certs(path)?,
            None => Vec::new(),
        };
        let key = match (&key, chain.is_empty()) {
            (Some(path), false) => {
                let der = read_key(path)?;
                let signing = rustls::crypto::ring::sign::any_supported_type(&der)
                    .map_err(|e| format!("{}: unusable private key: {e}", path.display()))?;
                let certified = CertifiedKey::new(chain.clone(), signing);
                certified.keys_match().map_err(|e| {
                    format!("{}: the private key does not belong to the certificate: {e}", path.display())
                })?;
                Some(Arc::new(certified))
            }
            (Some(path), true) => return Err(format!("{}: a private key without a certificate", path.display())),
            (None, false) => {
                let path = cert.as_ref().map_or_else(String::new, |p| p.display().to_string());
                return Err(format!("{path}: a certificate without its private key"));
            }
            (None, true) => None,
        };
        let roots = match &ca {
            Some(path) => {
                let mut store = RootCertStore::empty();
                for c in read_certs(path)? {
                    store.add(c).map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
                }
                Some(Arc::new(store))
            }
            None => None,
        };
        Ok((Credential { chain, key, roots }, stamps))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate (expected PEM `BEGIN CERTIFICATE`)", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{}: not a PEM private key: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key (expected PEM `BEGIN PRIVATE KEY`)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, cn: &str) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![cn.to_owned()]).expect("params").self_signed(&key).expect("cert");
        fs::create_dir_all(dir).expect("dir");
        fs::write(dir.join("tls.crt"), cert.pem()).expect("write");
        fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write");
    }

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("strait-cred-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    // GW-2: a named credential is read from DIR/<name>, reloaded when it changes on disk, and
    // a broken replacement keeps the last good one.
    #[test]
    fn named_credentials_reload_and_survive_bad_files() {
        let dir = temp("named");
        write_pair(&dir.join("shop"), "a.example.com");
        let creds = Credentials::new(Some(dir.clone()));
        let source = CredentialSource::Named("shop".into());
        let first = creds.get(&source).expect("loads");
        assert!(first.key.is_some() && first.roots.is_none());
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        write_pair(&dir.join("shop"), "b.example.com");
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        let second = creds.get(&source).expect("reloads");
        assert_ne!(first.chain, second.chain);
        fs::write(dir.join("shop").join("tls.key"), "garbage").expect("write");
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        let third = creds.get(&source).expect("keeps the last good");
        assert_eq!(third.chain, second.chain);
        // The separate CA secret is found.
        write_pair(&dir.join("shop-cacert"), "ca");
        fs::rename(dir.join("shop-cacert").join("tls.crt"), dir.join("shop-cacert").join("ca.crt")).expect("mv");
        let fresh = Credentials::new(Some(dir.clone()));
        write_pair(&dir.join("shop"), "c.example.com");
        assert!(fresh.get(&source).expect("loads").roots.is_some());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = temp("errors");
        let creds = Credentials::new(Some(dir.clone()));
        let e = creds.get(&CredentialSource::Named("missing".into())).expect_err("missing");
        assert!(e.contains("missing/tls.crt"), "{e}");
        let e = Credentials::new(None).get(&CredentialSource::Named("x".into())).expect_err("no dir");
        assert!(e.contains("--credentials"), "{e}");
        write_pair(&dir.join("a"), "a");
        write_pair(&dir.join("b"), "b");
        let mixed = CredentialSource::Files {
            cert: Some(dir.join("a").join("tls.crt")),
            key: Some(dir.join("b").join("tls.key")),
            ca: None,
        };
        let e = creds.get(&mixed).expect_err("mismatch");
        assert!(e.contains("does not belong"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
