//! The local-directory source: every `*.yaml`/`*.yml` file in one directory, re-read when any
//! of them changes (CFG-1).
//!
//! Change detection polls file names, sizes and modification times. Polling every 200 ms keeps
//! the "applied within 1 s" promise, costs one `readdir` plus a `stat` per file, and works the
//! same on every filesystem, including the symlink swaps Kubernetes ConfigMap volumes use.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{Diagnostic, Located, Origin, Resource, parse_file};

/// A snapshot of what a directory held, to tell whether it changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

/// A configuration directory being watched.
#[derive(Debug)]
pub struct ConfigDir {
    dir: PathBuf,
    last: Option<Fingerprint>,
}

impl ConfigDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), last: None }
    }

    /// Re-reads the directory if anything in it changed since the last call; `None` when
    /// nothing did.
    pub fn poll(&mut self) -> Option<Loaded> {
        let fingerprint = match fingerprint(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                let d = Diagnostic::error(Origin::new(&self.dir, 0), None, format!("cannot read the directory: {e}"));
                let changed = self.last.take().is_some();
                return changed.then(|| Loaded::failed(d));
            }
        };
        if self.last.as_ref() == Some(&fingerprint) {
            return None;
        }
        self.last = Some(fingerprint);
        Some(load_dir(&self.dir))
    }
}

/// The outcome of reading a directory.
#[derive(Debug, Default)]
pub struct Loaded {
    pub resources: Vec<Located<Resource>>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Loaded {
    fn failed(d: Diagnostic) -> Self {
        Self { resources: Vec::new(), diagnostics: vec![d] }
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

fn yaml_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if is_yaml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn fingerprint(dir: &Path) -> io::Result<Fingerprint> {
    let mut entries = Vec::new();
    for path in yaml_files(dir)? {
        // A file can vanish between readdir and stat; it will show in the next poll.
        if let Ok(meta) = fs::metadata(&path) {
            entries.push((path, meta.len(), meta.modified().ok()));
        }
    }
    Ok(Fingerprint(entries))
}

/// Reads and parses every YAML file of `dir`.
pub fn load_dir(dir: &Path) -> Loaded {
    let files = match yaml_files(dir) {
        Ok(files) => files,
        Err(e) => {
            return Loaded::failed(Diagnostic::error(
                Origin::new(dir, 0),
                None,
                format!("cannot read the configuration directory: {e}"),
            ));
        }
    };
    let mut loaded = Loaded::default();
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => {
                let (resources, diagnostics) = parse_file(&file, &text);
                loaded.resources.extend(resources);
                loaded.diagnostics.extend(diagnostics);
            }
            Err(e) => {
                loaded.diagnostics.push(Diagnostic::error(Origin::new(&file, 0), None, format!("cannot read: {e}")))
            }
        }
    }
    loaded
}
