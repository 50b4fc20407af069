//! Writes `deploy/crds` from strait's configuration types (`strait::config::crds`), or with
//! `--check` only says whether the committed files are up to date. Run through
//! `cargo xtask gen-crds [--check]`, which builds it with the `crd-schema` feature.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (check, dir) = match (args.next(), args.next()) {
        (Some(flag), Some(dir)) if flag == "--check" => (true, PathBuf::from(dir)),
        (Some(dir), None) => (false, PathBuf::from(dir)),
        _ => {
            eprintln!("usage: gen-crds [--check] DIR");
            return ExitCode::FAILURE;
        }
    };
    let files = match strait::config::crds::crd_files() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("gen-crds: cannot render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = Vec::new();
    for (name, yaml) in &files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(yaml.as_str()) {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
        } else if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, yaml)) {
            eprintln!("gen-crds: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("gen-crds: wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        eprintln!("gen-crds: out of date (run `cargo xtask gen-crds`): {}", stale.join(", "));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
