//! A real kube-apiserver for the Kubernetes tests, built once per machine.
//!
//! No registry this project reaches ships a kube-apiserver binary, so `kube-apiserver.sh` (next
//! to this crate's `Cargo.toml`) builds one from Debian bookworm's `kubernetes` source package
//! with Debian's Go, into `~/.cache/strait/kube-apiserver/<version>/`. The tests
//! (`tests/src/kube.rs`) look for it there; etcd comes from the `etcd-server` package.
//!
//! Idempotent: a cached binary that reports the right version means nothing to do. The script
//! builds in a scratch directory and renames it into place only when the build succeeded.

use std::{env, io, path::PathBuf, process::Command};

use crate::{Result, apt_install, is_root, missing_of, progress::Step, run};

/// The version Debian bookworm's source package builds (`1.20.5+really1.20.2`). Keep in step with
/// `KUBE_APISERVER_VERSION` in `tests/src/kube.rs` and `DEB_VERSION` in the script.
pub const KUBE_APISERVER_VERSION: &str = "1.20.2";

/// Only needed while building: Go 1.19 (what 1.20 builds with in bookworm) and the reflect2 fix.
const BUILD_PACKAGES: &[&str] = &["golang-1.19-go", "golang-github-modern-go-reflect2-dev"];

/// `$STRAIT_CACHE_DIR`, else `$XDG_CACHE_HOME/strait`, else `~/.cache/strait`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = env::var_os("STRAIT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("strait");
    }
    PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/strait")
}

fn cached_version_ok(binary: &std::path::Path) -> bool {
    Command::new(binary).arg("--version").output().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).trim() == format!("Kubernetes v{KUBE_APISERVER_VERSION}")
    })
}

pub fn ensure_kube_apiserver(step: &mut Step<'_, io::Stderr>) -> Result {
    let dest = cache_root().join("kube-apiserver").join(KUBE_APISERVER_VERSION);
    let binary = dest.join("kube-apiserver");
    if cached_version_ok(&binary) {
        step.outcome("present");
        return Ok(());
    }
    let missing = missing_of(BUILD_PACKAGES)?;
    if !missing.is_empty() {
        if !is_root() {
            return Err(format!(
                "building kube-apiserver needs {}; apt-get needs root: run `sudo -E cargo xtask setup` once",
                missing.join(" ")
            ));
        }
        step.start(&format!("installing what its build needs: {}", missing.join(" ")));
        apt_install(&missing)?;
    }
    step.start(&format!(
        "building it from Debian's source package into {} (once per machine; about 5 minutes, 1.5 GB of memory)",
        dest.display()
    ));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kube-apiserver.sh");
    run(Command::new("bash").arg(&script).arg(KUBE_APISERVER_VERSION).arg(&dest), "building kube-apiserver")?;
    if !cached_version_ok(&binary) {
        return Err(format!("{} was built but does not report v{KUBE_APISERVER_VERSION}", binary.display()));
    }
    step.outcome("built");
    Ok(())
}

/// Pinned: what `deploy/` is checked against must not change under the tests.
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// `kubernetes-validate` (PyPI), which checks manifests against the schemas of many Kubernetes
/// releases, in its own venv under the cache (`tests/tests/kube_deploy.rs` runs it from there).
pub fn ensure_kubernetes_validate(step: &mut Step<'_, io::Stderr>) -> Result {
    let venv = cache_root().join("kubernetes-validate");
    let bin = venv.join("bin").join("kubernetes-validate");
    let installed = Command::new(&bin).arg("--version").output();
    if installed
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == KUBERNETES_VALIDATE_VERSION)
    {
        step.outcome("present");
        return Ok(());
    }
    step.start(&format!("installing it into {}", venv.display()));
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv")?;
    run(
        Command::new(venv.join("bin").join("pip")).args([
            "install",
            "-q",
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        ]),
        "pip install kubernetes-validate",
    )?;
    step.outcome("installed");
    Ok(())
}
