//! `strait ctl`: tools for operators (CFG-4), offline on a configuration directory or against a
//! running proxy's admin API.
//!
//! `proxy-config` shows what a running node proxy or waypoint holds (see `proxy_config`).
//! `validate` runs exactly what `strait node` runs on a reload (`config::load_dir`, then
//! `model::compile`), so a directory it passes is one the node proxy will apply, and every
//! problem is printed as `file:line: error|warning: field `x`: message`.

use std::{io::Write, path::Path};

use clap::Subcommand;

mod admin_client;
mod proxy_config;
mod render;
mod table;
pub mod waypoint;

pub use proxy_config::{Output, ProxyConfigArgs, ViewCommand};

use crate::config::{self, Diagnostic};
use crate::model::{self, CompileOptions, DEFAULT_ROOT_NAMESPACE};

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Check a configuration directory as `strait node` would load it; exits non-zero on errors.
    Validate {
        /// Directory of Kubernetes and Istio YAML resources.
        dir: std::path::PathBuf,
        /// Namespace whose policies apply mesh-wide.
        #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
    },
    /// Show what a running `strait node` or `strait waypoint` holds, from its admin API:
    /// workloads, services, policies, certs, routes, clusters, endpoints.
    #[command(alias = "pc")]
    ProxyConfig(ProxyConfigArgs),
    /// A namespace's waypoint (a Gateway API Gateway of class istio-waypoint), in the
    /// Kubernetes API server: apply, list, delete.
    #[command(subcommand)]
    Waypoint(waypoint::WaypointCommand),
    /// The mesh CA's files, in Istio's plug-in layout (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem), for the `cacerts` Secret `deploy/` mounts.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new self-signed mesh root in DIR; a DIR that already holds a CA is left as it is.
    Init {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The trust domain of the mesh's SPIFFE identities.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

pub fn run(command: CtlCommand) -> anyhow::Result<()> {
    match command {
        CtlCommand::Validate { dir, root_namespace } => {
            let options = CompileOptions { root_namespace };
            let report = validate(&dir, &options, &mut std::io::stdout().lock())?;
            if report.errors > 0 {
                anyhow::bail!("{} has {} error(s); `strait node` would reject it", dir.display(), report.errors);
            }
            Ok(())
        }
        CtlCommand::ProxyConfig(args) => proxy_config::run(args),
        CtlCommand::Waypoint(command) => waypoint::run(command),
        CtlCommand::Ca(CaCommand::Init { dir, trust_domain }) => {
            let existed = dir.join("ca-key.pem").exists();
            crate::identity::LocalCa::load_or_create(&dir, &trust_domain)?;
            // The creation lock is no CA file: `--from-file=DIR` would put it in the Secret.
            let _ = std::fs::remove_file(dir.join(".lock"));
            let what = if existed { "already holds a CA; left as it is" } else { "now holds a new mesh CA" };
            println!(
                "{} {what}.\nkubectl create secret generic cacerts -n strait-system --from-file={}",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
    }
}

/// Counts of what `validate` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub resources: usize,
    pub errors: usize,
    pub warnings: usize,
}

/// Loads and compiles `dir`, writes every diagnostic (by file and line) and a summary line.
pub fn validate(dir: &Path, options: &CompileOptions, out: &mut impl Write) -> std::io::Result<Report> {
    let loaded = config::load_dir(dir);
    let (_, mut compiled) = model::compile_with(&loaded.resources, options);
    loaded.locate(&mut compiled);
    let mut diagnostics: Vec<&Diagnostic> = loaded.diagnostics.iter().chain(&compiled).collect();
    diagnostics.sort_by(|a, b| (&a.origin.file, a.origin.line).cmp(&(&b.origin.file, b.origin.line)));
    for d in &diagnostics {
        writeln!(out, "{d}")?;
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let report = Report { resources: loaded.resources.len(), errors, warnings: diagnostics.len() - errors };
    writeln!(
        out,
        "{}: {} resource(s), {} error(s), {} warning(s)",
        dir.display(),
        report.resources,
        report.errors,
        report.warnings
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::PathBuf,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("strait-ctl-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        fn write(&self, name: &str, text: &str) {
            fs::write(self.0.join(name), text).expect("write config file");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: foo\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: foo\n  labels: {app: web}\nspec:\n  containers:\n  - name: c\n    ports:\n    - name: http\n      containerPort: 8080\nstatus:\n  podIP: 10.1.0.10\n";

    fn run_validate(dir: &TempDir) -> (Report, Vec<String>) {
        let mut out = Vec::new();
        let report = validate(&dir.0, &CompileOptions::default(), &mut out).expect("write to a Vec");
        let text = String::from_utf8(out).expect("utf-8");
        let prefix = format!("{}/", dir.0.display());
        (report, text.lines().map(|l| l.replace(&prefix, "")).collect())
    }

    #[test]
    fn clean_directory_reports_only_the_summary() {
        let dir = TempDir::new();
        dir.write("mesh.yaml", MESH);
        let (report, lines) = run_validate(&dir);
        assert_eq!(report, Report { resources: 2, errors: 0, warnings: 0 });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].ends_with(": 2 resource(s), 0 error(s), 0 warning(s)"), "{lines:?}");
    }

    #[test]
    fn every_problem_is_printed_with_file_line_and_field() {
        let dir = TempDir::new();
        dir.write("mesh.yaml", MESH);
        dir.write(
            "policies.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: bad-action\n  namespace: foo\nspec:\n  action: DENIED\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: nobody\n  namespace: foo\nspec:\n  selector:\n    matchLabels:\n      app: ghost\n  rules:\n  - {}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: a\n  namespace: foo\nspec:\n  mtls:\n    mode: STRICT\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: b\n  namespace: foo\nspec:\n  mtls:\n    mode: PERMISSIVE\n",
        );
        dir.write(
            "services.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: foo\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - port: 80\n    targetPort: htp\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: foo\nstatus:\n  podIP: 10.1.0.99\n",
        );
        let (report, lines) = run_validate(&dir);
        let expected = [
            "policies.yaml:7: error: field `spec.action`: unknown variant `DENIED`, expected one of `ALLOW`, `DENY`, `AUDIT`, `CUSTOM`",
            "policies.yaml:16: warning: field `spec.selector.matchLabels`: no workload has the labels app=ghost; the policy applies to nothing",
            "policies.yaml:33: warning: field `metadata.name`: the mTLS mode of namespace `foo` is already set by PeerAuthentication foo/a at",
            "services.yaml:11: warning: field `spec.ports[0].targetPort`: no pod selected by the service has a container port named `htp`",
            "services.yaml:16: error: field `metadata.name`: duplicate Pod foo/web: already defined at",
        ];
        for (line, want) in lines.iter().zip(expected) {
            assert!(line.starts_with(want), "\n got: {line}\nwant: {want}\n all: {lines:#?}");
        }
        assert_eq!(lines.len(), expected.len() + 1, "{lines:#?}");
        assert_eq!((report.errors, report.warnings), (2, 3), "{lines:#?}");
        assert!(lines.last().is_some_and(|l| l.ends_with("error(s), 3 warning(s)")), "{lines:?}");
    }
}
