//! CFG-1, CFG-4 as a new user meets them: every example of the seed documents (Istio's own YAML,
//! copied into `fixtures/seeds/`) and every sample of the README, each put alone in a
//! configuration directory and checked by the real `strait ctl validate`, loads without errors
//! and with the warnings recorded in `fixtures/seeds/expected.txt` (regenerate it with
//! `STRAIT_BLESS=1` after reviewing the difference).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/seeds");

/// One YAML example and where it was found.
struct Block {
    source: String,
    line: usize,
    text: String,
}

/// The YAML examples of a document: its ```yaml fences and its `<<EOF` heredocs (dedented), as
/// a reader would copy them. Blocks without `apiVersion:` at the start of a line (shell
/// sessions, `istioctl` output shown as YAML, JSON) are not configuration and are skipped.
fn blocks(source: &str, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        let fence = line == "```yaml" || line == "```yml";
        let heredoc = line.contains("<<EOF") || line.contains("<< EOF");
        if !(fence || heredoc) {
            i += 1;
            continue;
        }
        let end = |l: &str| if fence { l.trim() == "```" } else { l.trim() == "EOF" };
        let start = i + 1;
        let mut j = start;
        while j < lines.len() && !end(lines[j]) {
            j += 1;
        }
        let body = expand_shell_variables(&dedent(&lines[start..j.min(lines.len())]));
        if body.lines().any(|l| l.starts_with("apiVersion:")) {
            found.push(Block { source: source.to_owned(), line: start + 1, text: body });
        }
        i = j + 1;
    }
    found
}

/// Variables the seeds' commands set before `kubectl apply -f - <<EOF`, whose shell expands them
/// in the document before Istio (or strait) sees it: each with a value of the kind it stands for.
const SHELL_VARIABLES: [(&str, &str); 2] = [
    // Seed 003: `export CLUSTER2_GW_ADDR=$(kubectl get svc ... -o jsonpath=...ingress[0].ip)`,
    // and the same for cluster 1's egress gateway.
    ("${CLUSTER2_GW_ADDR}", "192.0.2.10"),
    ("${CLUSTER1_EGW_ADDR}", "192.0.2.20"),
];

fn expand_shell_variables(text: &str) -> String {
    SHELL_VARIABLES.iter().fold(text.to_owned(), |text, (variable, value)| text.replace(variable, value))
}

fn dedent(lines: &[&str]) -> String {
    let indent = lines.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min();
    let indent = indent.unwrap_or(0);
    lines.iter().map(|l| format!("{}\n", l.get(indent..).unwrap_or("").trim_end())).collect()
}

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("strait-seeds-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `strait ctl validate` on a directory holding only `block`: whether it passed, and what it
/// printed with the directory's path replaced by `DIR`.
fn validate(block: &Block) -> (bool, String) {
    let dir = TempDir::new();
    fs::write(dir.0.join("example.yaml"), &block.text).expect("write the example");
    let out = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["ctl", "validate"])
        .arg(&dir.0)
        .output()
        .expect("run strait ctl validate");
    let text = String::from_utf8_lossy(&out.stdout).replace(&dir.0.display().to_string(), "DIR");
    (out.status.success(), text)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The seed documents as fixtures; the flattened copy of seed 004 is checked on its own below.
fn seed_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(FIXTURES)
        .expect("fixtures directory")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (name.ends_with(".md") || name.ends_with(".txt")) && !name.contains("flattened") && name != "expected.txt"
        })
        .collect();
    files.sort();
    files
}

/// Seed examples that are fragments Istio's own admission webhook refuses too, so strait must
/// (file, line of the block in the fixture, why).
const REFUSED_BY_ISTIO_TOO: [(&str, usize, &str); 2] = [
    (
        "003-istio-1.6-docs.md",
        107,
        "seed line 619: the docs show a VirtualService's `gateways` before adding its routes; Istio refuses a \
         VirtualService without `http`, `tcp` or `tls`",
    ),
    (
        "003-istio-1.6-docs.md",
        1163,
        "seed line 7374: `kubectl get -o yaml` output with `hosts` elided; Istio refuses a VirtualService without hosts",
    ),
];

#[test]
fn every_seed_example_loads_with_the_expected_warnings_only() {
    let mut report = String::new();
    let mut failures = Vec::new();
    let mut count = 0;
    for file in seed_files() {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_owned();
        for block in blocks(&name, &read(&file)) {
            count += 1;
            let (passed, output) = validate(&block);
            let refused = REFUSED_BY_ISTIO_TOO.iter().any(|(f, l, _)| *f == block.source && *l == block.line);
            if passed == refused {
                let what = if passed { "accepted, but Istio refuses it" } else { "rejected" };
                failures.push(format!("{}:{} {what}\n{output}", block.source, block.line));
            }
            report.push_str(&format!("## {}:{}\n{output}\n", block.source, block.line));
        }
    }
    assert!(count >= 90, "only {count} examples found in {FIXTURES}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let expected_path = Path::new(FIXTURES).join("expected.txt");
    if std::env::var_os("STRAIT_BLESS").is_some() {
        fs::write(&expected_path, &report).expect("write expected.txt");
        return;
    }
    let expected = read(&expected_path);
    if expected != report {
        let diff: Vec<String> = expected
            .lines()
            .zip(report.lines())
            .enumerate()
            .filter(|(_, (e, g))| e != g)
            .take(10)
            .map(|(i, (e, g))| format!("line {}:\n  expected: {e}\n       got: {g}", i + 1))
            .collect();
        panic!(
            "the diagnostics of the seed examples changed (STRAIT_BLESS=1 regenerates expected.txt):\n{}\n({} vs {} lines)",
            diff.join("\n"),
            expected.lines().count(),
            report.lines().count()
        );
    }
}

/// Warnings a README sample may give: about what the sample leaves out on purpose.
const README_WARNINGS: [&str; 3] = ["is not a known service", "applies to nothing", "not supported yet; ignored"];

#[test]
fn every_readme_sample_loads_without_errors() {
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let samples = blocks("README.md", &read(Path::new(readme)));
    assert!(samples.len() >= 2, "README samples: {}", samples.len());
    for sample in samples {
        let (passed, output) = validate(&sample);
        assert!(passed, "README.md:{}\n{output}", sample.line);
        for line in output.lines().filter(|l| l.contains(": warning: ")) {
            assert!(README_WARNINGS.iter().any(|w| line.contains(w)), "README.md:{}: {line}", sample.line);
        }
    }
}

// What a user pasting seed 004 as it is gets: its YAML lost its indentation, and every example
// is refused with a reason that says so, at the line where it shows, rather than accepted with
// an empty `spec`.
#[test]
fn flattened_examples_are_refused_with_the_reason() {
    let file = "004-gateway-and-egress-flattened.txt";
    let examples = blocks(file, &read(&Path::new(FIXTURES).join(file)));
    assert_eq!(examples.len(), 5);
    for example in &examples {
        let (passed, output) = validate(example);
        assert!(!passed, "{file}:{}: accepted:\n{output}", example.line);
        let first = output.lines().next().unwrap_or("");
        let said = ["lost its indentation", "out of step", "not supported yet"];
        assert!(said.iter().any(|s| first.contains(s)), "{file}:{}: {output}", example.line);
    }
}
