//! The CRDs of `deploy/crds` (OPS-2), generated from strait's configuration types: the
//! committed files are what the generator writes, and a real kube-apiserver with them accepts
//! the Istio resources of the seed docs that strait's loader accepts, storing them unchanged
//! (nothing pruned), while refusing what strait could not read.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use strait_testbed::kube::{KubeApi, workspace_dir};

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The Istio kinds deploy/crds defines.
const CRD_KINDS: &[&str] = &[
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "ServiceEntry",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
];

/// YAML documents in a seed doc: fenced ```yaml blocks and `<<EOF` heredocs, dedented, with
/// the no-break spaces of pages copied from the web made plain spaces again.
fn yaml_blocks(text: &str) -> Vec<String> {
    let text = text.replace('\u{a0}', " ");
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_end();
        let end: Option<&str> = if line.trim_start().starts_with("```yaml") {
            Some("```")
        } else if line.ends_with("<<EOF")
            || line.ends_with("<< EOF")
            || line.contains("<<EOF ")
            || line.contains("<< EOF ")
        {
            Some("EOF")
        } else {
            None
        };
        if let Some(end) = end {
            let body: Vec<&str> = lines[i + 1..].iter().take_while(|l| l.trim() != end).copied().collect();
            i += body.len() + 1;
            let indent = body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min();
            let indent = indent.unwrap_or(0);
            let dedented: Vec<&str> = body.iter().map(|l| l.get(indent..).unwrap_or("")).collect();
            blocks.push(dedented.join("\n"));
        }
        i += 1;
    }
    blocks
}

/// The string constants of a Rust file of seed configurations (`const NAME: &str = "\` ... `";`).
fn rust_yaml_consts(text: &str) -> Vec<String> {
    text.split("&str = \"\\\n")
        .skip(1)
        .filter_map(|rest| rest.split("\n\";").next())
        .map(|body| body.replace("\\\"", "\"").replace("\\\\", "\\"))
        .collect()
}

/// Documents of the CRD kinds, each with where it came from.
fn istio_documents(source: &str, text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for block in text.split("\n---").map(str::trim) {
        let api_version = block.lines().find_map(|l| l.strip_prefix("apiVersion:")).map(str::trim);
        let kind = block.lines().find_map(|l| l.strip_prefix("kind:")).map(str::trim);
        if let (Some(api_version), Some(kind)) = (api_version, kind)
            && (api_version.starts_with("networking.istio.io/") || api_version.starts_with("security.istio.io/"))
            && CRD_KINDS.contains(&kind)
        {
            found.push((format!("{source} ({kind} #{})", found.len() + 1), format!("{block}\n")));
        }
    }
    found
}

/// Whether strait's loader accepts `doc` alone (`strait ctl validate`: errors exit non-zero).
fn loader_accepts(doc: &str, dir: &Path) -> io::Result<bool> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    fs::write(dir.join("doc.yaml"), doc)?;
    let out = Command::new(strait_testbed::require_bin("strait")?).args(["ctl", "validate"]).arg(dir).output()?;
    Ok(out.status.success())
}

#[test]
fn crds_accept_the_seed_configs_unchanged() -> io::Result<()> {
    let mut docs = Vec::new();
    // The seed documents as the repository carries them (proxy/tests/seeds.rs reads them too).
    let seeds = workspace_dir().join("proxy/tests/fixtures/seeds");
    let mut files: Vec<PathBuf> = fs::read_dir(&seeds)
        .map_err(|e| io::Error::other(format!("{}: {e}", seeds.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n != "expected.txt"))
        .collect();
    files.sort();
    for file in files {
        let text = fs::read_to_string(&file)?;
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for block in yaml_blocks(&text) {
            docs.extend(istio_documents(&name, &block));
        }
    }
    let from_docs = docs.len();
    let routes = workspace_dir().join("proxy/src/model/routes/tests/seeds.rs");
    for block in rust_yaml_consts(&fs::read_to_string(&routes)?) {
        docs.extend(istio_documents("proxy/src/model/routes/tests/seeds.rs", &block));
    }
    assert!(
        from_docs >= 10 && docs.len() > from_docs,
        "too few seed documents found: {from_docs} + {}",
        docs.len() - from_docs
    );

    let api = KubeApi::start_without_crds()?;
    api.install_deploy()?;
    let scratch = api.dir().join("loader");
    let (mut applied, mut skipped) = (0, Vec::new());
    for (n, (source, doc)) in docs.iter().enumerate() {
        if !loader_accepts(doc, &scratch)? {
            skipped.push(source.clone());
            continue;
        }
        // Each document in a namespace of its own, unless it names one.
        let file = api.dir().join(format!("seed-{n}.yaml"));
        fs::write(&file, doc)?;
        let file = file.to_string_lossy().into_owned();
        let local = json(
            &api.kubectl(&["create", "--dry-run=client", "-o", "json", "-f", &file])
                .map_err(|e| io::Error::other(format!("{source}: {e}\n{doc}")))?,
        );
        let namespace = match local["metadata"]["namespace"].as_str() {
            Some(ns) => ns.to_string(),
            None => format!("seed-{n}"),
        };
        let _ = api.kubectl(&["create", "namespace", &namespace]);
        api.kubectl(&["apply", "--server-side", "--force-conflicts", "-n", &namespace, "-f", &file])
            .map_err(|e| io::Error::other(format!("{source} refused by the CRD: {e}\n{doc}")))?;
        let kind = local["kind"].as_str().unwrap_or_default();
        let group = local["apiVersion"].as_str().and_then(|v| v.split('/').next()).unwrap_or_default();
        let name = local["metadata"]["name"].as_str().unwrap_or_default();
        let stored = json(&api.kubectl(&[
            "get",
            &format!("{}.{group}", kind.to_lowercase()),
            name,
            "-n",
            &namespace,
            "-o",
            "json",
        ])?);
        assert_eq!(stored["spec"], local["spec"], "{source}: the API server changed (pruned) the spec\n{doc}");
        applied += 1;
    }
    eprintln!(
        "kube_deploy: {applied} seed documents applied unchanged; {} the loader refuses alone were skipped: {skipped:?}",
        skipped.len()
    );
    assert!(applied >= 10, "only {applied} seed documents were applied");

    // Istio's own CRDs (tests/fixtures/kube, built from Istio's schemas) have the same identity
    // as strait's, and can replace them under stored objects, and be replaced back: either set
    // can be installed over the other.
    let istio_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube/istio-crds.json");
    let istio = json(&fs::read_to_string(&istio_file)?);
    let identity = |crd: &Value| {
        let versions: Vec<(Value, Value, Value)> = crd["spec"]["versions"]
            .as_array()
            .map(|vs| vs.iter().map(|v| (v["name"].clone(), v["served"].clone(), v["storage"].clone())).collect())
            .unwrap_or_default();
        (crd["spec"]["group"].clone(), crd["spec"]["names"].clone(), crd["spec"]["scope"].clone(), versions)
    };
    let ours = json(&api.kubectl(&["get", "crd", "-l", "app.kubernetes.io/part-of=strait", "-o", "json"])?);
    let ours = ours["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(ours.len(), CRD_KINDS.len());
    for crd in &ours {
        let name = &crd["metadata"]["name"];
        let theirs = istio["items"]
            .as_array()
            .and_then(|items| items.iter().find(|c| c["metadata"]["name"] == *name))
            .unwrap_or_else(|| panic!("Istio has no CRD {name}"));
        assert_eq!(identity(crd), identity(theirs), "{name}: not Istio's names, scope or versions");
    }
    // A seed VirtualService that was applied above.
    let file = (0..docs.len())
        .map(|n| api.dir().join(format!("seed-{n}.yaml")))
        .find(|f| fs::read_to_string(f).is_ok_and(|doc| doc.contains("kind: VirtualService")))
        .expect("a seed VirtualService was applied");
    let file = file.to_string_lossy().into_owned();
    let before = json(&api.kubectl(&["get", "-f", &file, "-o", "json"])?);
    api.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &istio_file.to_string_lossy()])?;
    let under_istio = json(&api.kubectl(&["get", "-f", &file, "-o", "json"])?);
    assert_eq!(under_istio["spec"], before["spec"], "the object changed under Istio's CRD");
    api.install_deploy()?;
    let back = json(&api.kubectl(&["get", "-f", &file, "-o", "json"])?);
    assert_eq!(back["spec"], before["spec"], "the object changed back under strait's CRD");

    // And the schemas do refuse what strait cannot read: a timeout that is not a duration, a
    // port that is not a number, an action that does not exist.
    for (what, bad) in [
        (
            "timeout",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: default}\nspec:\n  \
             hosts: [reviews]\n  http: [{route: [{destination: {host: reviews}}], timeout: {seconds: 1}}]\n",
        ),
        (
            "port",
            "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: bad, namespace: \
             default}\nspec:\n  host: reviews\n  trafficPolicy:\n    portLevelSettings: [{port: {number: [80]}}]\n",
        ),
        (
            "action",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: \
             default}\nspec: {action: PERMIT}\n",
        ),
    ] {
        let refused = api.apply_fails(bad)?;
        assert!(refused.contains("Invalid value") || refused.contains("invalid"), "{what}: {refused}");
    }
    Ok(())
}

/// `cargo run --example gen-crds -- --check DIR` (the generator, with the `crd-schema` feature).
fn gen_crds_check(dir: &Path) -> io::Result<(bool, String)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_dir())
        .args(["run", "--quiet", "-p", "strait", "--features", "crd-schema", "--example", "gen-crds", "--", "--check"])
        .arg(dir)
        .output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// The committed deploy/crds is what strait's types generate: a type changed without `cargo
/// xtask gen-crds` fails here (and in `cargo xtask test`'s own check).
#[test]
fn committed_crds_are_what_the_types_generate() -> io::Result<()> {
    let committed = workspace_dir().join("deploy/crds");
    let (ok, report) = gen_crds_check(&committed)?;
    assert!(ok, "deploy/crds is out of date: {report}");
    // The check does notice a difference: a copy with one property renamed fails it.
    let copy = std::env::temp_dir().join(format!("strait-kube-deploy-crds-{}", std::process::id()));
    fs::create_dir_all(&copy)?;
    for entry in fs::read_dir(&committed)? {
        let entry = entry?;
        fs::copy(entry.path(), copy.join(entry.file_name()))?;
    }
    let file = copy.join("peerauthentications.security.istio.io.yaml");
    let text = fs::read_to_string(&file)?;
    fs::write(&file, text.replacen("portLevelMtls:", "portLevelMTLS:", 1))?;
    let (ok, report) = gen_crds_check(&copy)?;
    fs::remove_dir_all(&copy)?;
    assert!(!ok && report.contains("peerauthentications"), "a changed CRD passed the check: {report}");
    Ok(())
}
