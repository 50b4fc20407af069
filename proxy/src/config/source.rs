//! The local-directory source: every `*.yaml`/`*.yml` file in one directory, re-read when any
//! of them changes (CFG-1), and only once the directory has stopped changing (OPS-5).
//!
//! Change detection polls file names, sizes and modification times: one `readdir` plus a `stat`
//! per file, the same on every filesystem, including the symlink swaps Kubernetes ConfigMap
//! volumes use. A directory rewritten file by file passes through states nobody meant (no files
//! at all, pods without their Services), so a change is read only after the directory has stayed
//! the same for [`SETTLE`]; and while a [`GENERATION_FILE`] is present, only when its content
//! changes, which lets a writer say explicitly that the directory is whole again.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

use super::syntax::normalize_indentation;
use super::{Diagnostic, Located, Origin, Resource, locate, parse_file};

/// How often the directory is checked for changes.
pub const POLL: Duration = Duration::from_millis(100);
/// How long the directory must stay unchanged before it is read. Copies of a directory (`cp`,
/// `rsync`, `git checkout`) write their files within milliseconds of each other, and a script
/// writing one file per command leaves tens of milliseconds between them; 500 ms covers both
/// with a wide margin and keeps CFG-1's "applied within 1 s": a change is seen within one
/// `POLL`, read `SETTLE` later at the next poll, compiled and published (measured at 0.62 s
/// from the write to both node proxies applying it, `config_reload` test).
pub const SETTLE: Duration = Duration::from_millis(500);
/// The optional generation marker: while it exists, changes apply only when its content does.
pub const GENERATION_FILE: &str = ".strait-generation";
/// After this long without the directory settling, say why nothing is applied.
const UNSETTLED_WARNING: Duration = Duration::from_secs(5);
/// A directory that never stays still for [`SETTLE`] (a writer changing a file every 100 ms,
/// as `cargo xtask bench control` does) is read anyway once it has been changing this long, or
/// no change would ever apply: measured, 300 pod changes over 30 s applied none until the
/// writes stopped. istiod bounds its debounce the same way (10 s). A state read this way still
/// passes the loss guard (`--empty-config-hold`); a writer that must never be read half-way
/// uses the generation marker, which this does not override.
pub const MAX_UNSETTLED: Duration = Duration::from_secs(10);

/// A snapshot of what a directory held, to tell whether it changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint {
    files: Vec<(PathBuf, u64, Option<SystemTime>)>,
    /// The generation marker's content, when there is one.
    generation: Option<String>,
}

/// What to do with the directory as it is now (OPS-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing changed since it was last read.
    Unchanged,
    /// It changed, but has not been quiet for long enough.
    Settling,
    /// It changed but the generation marker did not: the writer has not declared it whole.
    AwaitingGeneration,
    /// Quiet for long enough: read it.
    Read,
}

/// When a changing directory may be read, apart from any I/O (OPS-5).
#[derive(Debug, Default)]
pub struct Settle {
    /// What the directory held when it was last read.
    read: Option<Fingerprint>,
    /// A state not read yet, and since when the directory has been in it.
    candidate: Option<(Fingerprint, Instant)>,
    /// Since when the directory has differed from what was read, through any number of states.
    changing_since: Option<Instant>,
}

impl Settle {
    /// Starts with a directory nobody has read, already unchanged since `since` (its newest
    /// modification), so a proxy starting on a quiet directory does not wait.
    pub fn starting(fingerprint: Fingerprint, since: Instant) -> Self {
        Self { read: None, candidate: Some((fingerprint, since)), changing_since: None }
    }

    /// Decides what to do with the directory found in state `fingerprint` at `now`.
    pub fn observe(&mut self, now: Instant, fingerprint: Fingerprint, settle: Duration) -> Step {
        if self.read.as_ref() == Some(&fingerprint) {
            self.candidate = None;
            self.changing_since = None;
            return Step::Unchanged;
        }
        let same_generation = fingerprint.generation.is_some()
            && self.read.as_ref().is_some_and(|read| read.generation == fingerprint.generation);
        if same_generation {
            self.candidate = None;
            self.changing_since = None;
            return Step::AwaitingGeneration;
        }
        let changing_since = *self.changing_since.get_or_insert(now);
        if self.read.is_some() && now.saturating_duration_since(changing_since) >= MAX_UNSETTLED {
            return Step::Read;
        }
        match &self.candidate {
            Some((candidate, since)) if *candidate == fingerprint => {
                if now.saturating_duration_since(*since) >= settle { Step::Read } else { Step::Settling }
            }
            _ => {
                self.candidate = Some((fingerprint, now));
                if settle.is_zero() { Step::Read } else { Step::Settling }
            }
        }
    }

    /// Records that the directory was read in state `fingerprint`.
    pub fn mark_read(&mut self, fingerprint: Fingerprint) {
        self.read = Some(fingerprint);
        self.candidate = None;
        self.changing_since = None;
    }

    /// Forgets what was read (the directory became unreadable): whatever comes back is new.
    fn forget(&mut self) -> bool {
        self.candidate = None;
        self.changing_since = None;
        self.read.take().is_some()
    }
}

/// A configuration directory being watched.
#[derive(Debug)]
pub struct ConfigDir {
    dir: PathBuf,
    settle: Settle,
    /// Since when the directory has been changing without settling, for one warning.
    unsettled_since: Option<Instant>,
    warned: bool,
    cache: ParseCache,
}

impl ConfigDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            settle: Settle::default(),
            unsettled_since: None,
            warned: false,
            cache: ParseCache::default(),
        }
    }

    /// The directory watched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first read, at start: waits until the directory has been quiet for [`SETTLE`], so a
    /// proxy started in the middle of a rewrite does not start from half of it.
    pub fn first_read(&mut self) -> Loaded {
        match fingerprint(&self.dir) {
            Ok(current) => {
                let age = newest_change(&self.dir).and_then(|t| t.elapsed().ok()).unwrap_or(SETTLE);
                let now = Instant::now();
                self.settle = Settle::starting(current, now.checked_sub(age.min(SETTLE)).unwrap_or(now));
            }
            Err(e) => return Loaded::failed(unreadable(&self.dir, &e)),
        }
        loop {
            match self.read_if_settled() {
                Ok(Some(loaded)) => return loaded,
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => return Loaded::failed(unreadable(&self.dir, &e)),
            }
        }
    }

    /// Re-reads the directory if it changed since the last read and has settled; `None` when
    /// there is nothing new to apply. An unreadable directory is reported once.
    pub fn poll(&mut self) -> Option<Loaded> {
        match self.read_if_settled() {
            Ok(loaded) => loaded,
            Err(e) => {
                self.cache = ParseCache::default();
                self.settle.forget().then(|| Loaded::failed(unreadable(&self.dir, &e)))
            }
        }
    }

    fn read_if_settled(&mut self) -> io::Result<Option<Loaded>> {
        let current = fingerprint(&self.dir)?;
        let now = Instant::now();
        let step = self.settle.observe(now, current.clone(), SETTLE);
        self.report_unsettled(step, now);
        if step != Step::Read {
            return Ok(None);
        }
        let loaded = load_dir_cached(&self.dir, &mut self.cache);
        // A write during the read makes it a mix of two states: settle again.
        let after = fingerprint(&self.dir)?;
        if after != current {
            self.settle.observe(now, after, SETTLE);
            return Ok(None);
        }
        self.settle.mark_read(current);
        Ok(Some(loaded))
    }

    fn report_unsettled(&mut self, step: Step, now: Instant) {
        match step {
            Step::Settling => {
                let since = *self.unsettled_since.get_or_insert(now);
                if !self.warned && now.saturating_duration_since(since) >= UNSETTLED_WARNING {
                    self.warned = true;
                    warn!(
                        dir = %self.dir.display(),
                        "the configuration directory has kept changing for {}s; it is applied once it stays \
                         unchanged for {}ms, or after {}s of changes",
                        UNSETTLED_WARNING.as_secs(),
                        SETTLE.as_millis(),
                        MAX_UNSETTLED.as_secs()
                    );
                }
            }
            Step::AwaitingGeneration => {
                if !self.warned {
                    self.warned = true;
                    info!(
                        dir = %self.dir.display(),
                        "the configuration directory changed but {GENERATION_FILE} did not: the change applies \
                         when a new generation is written there"
                    );
                }
            }
            Step::Unchanged | Step::Read => {
                self.unsettled_since = None;
                self.warned = false;
            }
        }
    }
}

/// The outcome of reading a directory.
#[derive(Debug, Default)]
pub struct Loaded {
    pub resources: Vec<Located<Resource>>,
    pub diagnostics: Vec<Diagnostic>,
    /// The text of each file read, so that diagnostics found later (by `model::compile`) can be
    /// pointed at their field's line: see [`Loaded::locate`].
    pub texts: BTreeMap<PathBuf, String>,
}

impl Loaded {
    fn failed(d: Diagnostic) -> Self {
        Self { diagnostics: vec![d], ..Self::default() }
    }

    /// Points each of `diagnostics` that names a field of a document read here at the line
    /// where that field is written, instead of the document's first line (CFG-1).
    pub fn locate(&self, diagnostics: &mut [Diagnostic]) {
        for (file, text) in &self.texts {
            if diagnostics.iter().any(|d| &d.origin.file == file && d.field.is_some()) {
                locate(diagnostics, file, text);
            }
        }
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

fn unreadable(dir: &Path, e: &io::Error) -> Diagnostic {
    Diagnostic::error(Origin::new(dir, 0), None, format!("cannot read the configuration directory: {e}"))
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
    let mut files = Vec::new();
    for path in yaml_files(dir)? {
        // A file can vanish between readdir and stat; it will show in the next poll.
        if let Ok(meta) = fs::metadata(&path) {
            files.push((path, meta.len(), meta.modified().ok()));
        }
    }
    let generation = fs::read_to_string(dir.join(GENERATION_FILE)).ok().map(|g| g.trim().to_owned());
    Ok(Fingerprint { files, generation })
}

/// The latest modification of the directory (a file added or removed) or of any file in it.
fn newest_change(dir: &Path) -> Option<SystemTime> {
    let entries = fs::read_dir(dir).ok()?.filter_map(Result::ok).filter_map(|e| e.metadata().ok());
    let own = fs::metadata(dir).ok();
    own.into_iter().chain(entries).filter_map(|m| m.modified().ok()).max()
}

/// Reads and parses every YAML file of `dir`.
pub fn load_dir(dir: &Path) -> Loaded {
    load_dir_cached(dir, &mut ParseCache::default())
}

/// One file as last parsed: what it gave, and the size and modification time it had just
/// before it was read.
#[derive(Debug)]
struct ParsedFile {
    len: u64,
    modified: SystemTime,
    resources: Vec<Located<Resource>>,
    diagnostics: Vec<Diagnostic>,
    text: String,
}

/// The parse of every file of a watched directory, so that a change re-parses only the files
/// it touched (CFG-1, CFG-3). Measured on `cargo xtask bench control` (100 files, 10,000 pods):
/// parsing the whole directory took most of a change's 0.46 CPU-s; one changed file takes a
/// hundredth of that, and reusing the others costs a clone of their resources.
#[derive(Debug, Default)]
struct ParseCache {
    files: BTreeMap<PathBuf, ParsedFile>,
}

/// Reads and parses the YAML files of `dir` that changed since `cache` saw them (by size and
/// modification time, as [`Fingerprint`] tells changes apart); the others come from `cache`.
/// A file's resources and diagnostics come from its own parse either way.
fn load_dir_cached(dir: &Path, cache: &mut ParseCache) -> Loaded {
    let files = match yaml_files(dir) {
        Ok(files) => files,
        Err(e) => return Loaded::failed(unreadable(dir, &e)),
    };
    cache.files.retain(|path, _| files.binary_search(path).is_ok());
    let mut loaded = Loaded::default();
    for file in files {
        // Taken before reading: a write during the read leaves a newer time, so the file is
        // read again next time rather than kept from a mix of two states.
        let stamp = fs::metadata(&file).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
        let reuse = cache.files.get(&file).filter(|p| stamp == Some((p.len, p.modified)));
        if let Some(parsed) = reuse {
            loaded.resources.extend(parsed.resources.iter().cloned());
            loaded.diagnostics.extend(parsed.diagnostics.iter().cloned());
            loaded.texts.insert(file, parsed.text.clone());
            continue;
        }
        match fs::read_to_string(&file) {
            Ok(text) => {
                let (resources, diagnostics) = parse_file(&file, &text);
                let text = normalize_indentation(&text).0.into_owned();
                loaded.resources.extend(resources.iter().cloned());
                loaded.diagnostics.extend(diagnostics.iter().cloned());
                loaded.texts.insert(file.clone(), text.clone());
                match stamp {
                    Some((len, modified)) => {
                        cache.files.insert(file, ParsedFile { len, modified, resources, diagnostics, text });
                    }
                    // Without a modification time a change cannot be told: parse it every time.
                    None => {
                        cache.files.remove(&file);
                    }
                }
            }
            Err(e) => {
                cache.files.remove(&file);
                loaded.diagnostics.push(Diagnostic::error(Origin::new(&file, 0), None, format!("cannot read: {e}")))
            }
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_millis(500);

    fn state(files: &[(&str, u64)], generation: Option<&str>) -> Fingerprint {
        Fingerprint {
            files: files.iter().map(|(name, len)| (PathBuf::from(name), *len, None)).collect(),
            generation: generation.map(str::to_owned),
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    // OPS-5: each intermediate state of a rewrite restarts the clock; only a state that lasts
    // the settle period is read, once.
    #[test]
    fn a_change_is_read_once_it_has_lasted_the_settle_period() {
        let t0 = Instant::now();
        let whole = state(&[("a.yaml", 10), ("b.yaml", 20)], None);
        let mut settle = Settle::default();
        settle.mark_read(whole.clone());
        let steps = [
            (0, state(&[], None), Step::Settling),
            (400, state(&[("a.yaml", 10)], None), Step::Settling),
            (800, state(&[("a.yaml", 10)], None), Step::Settling),
            (899, state(&[("a.yaml", 10)], None), Step::Settling),
            (900, state(&[("a.yaml", 10), ("b.yaml", 20)], None), Step::Unchanged),
            (1000, state(&[("a.yaml", 11), ("b.yaml", 20)], None), Step::Settling),
            (1500, state(&[("a.yaml", 11), ("b.yaml", 20)], None), Step::Read),
        ];
        for (at, fingerprint, expected) in steps {
            assert_eq!(settle.observe(ms(t0, at), fingerprint, S), expected, "at {at} ms");
        }
        settle.mark_read(state(&[("a.yaml", 11), ("b.yaml", 20)], None));
        assert_eq!(settle.observe(ms(t0, 1600), state(&[("a.yaml", 11), ("b.yaml", 20)], None), S), Step::Unchanged);
    }

    // OPS-5: with a generation marker, nothing is read until its content changes, however long
    // the files have been still; without it the settle rule applies again.
    #[test]
    fn a_generation_marker_holds_changes_until_it_changes() {
        let t0 = Instant::now();
        let mut settle = Settle::default();
        settle.mark_read(state(&[("a.yaml", 10)], Some("1")));
        let steps = [
            (0, state(&[], Some("1")), Step::AwaitingGeneration),
            (5000, state(&[("a.yaml", 12)], Some("1")), Step::AwaitingGeneration),
            (9000, state(&[("a.yaml", 12)], Some("2")), Step::Settling),
            (9500, state(&[("a.yaml", 12)], Some("2")), Step::Read),
        ];
        for (at, fingerprint, expected) in steps {
            assert_eq!(settle.observe(ms(t0, at), fingerprint, S), expected, "at {at} ms");
        }
        settle.mark_read(state(&[("a.yaml", 12)], Some("2")));
        assert_eq!(settle.observe(ms(t0, 9600), state(&[("a.yaml", 13)], None), S), Step::Settling);
        assert_eq!(settle.observe(ms(t0, 10100), state(&[("a.yaml", 13)], None), S), Step::Read);
    }

    // At start, a directory whose last change is older than the settle period is read at once;
    // one changed just now waits for the rest of it.
    #[test]
    fn at_start_a_quiet_directory_is_read_at_once() {
        let t0 = Instant::now();
        let dir = state(&[("a.yaml", 10)], Some("7"));
        let mut quiet = Settle::starting(dir.clone(), t0);
        assert_eq!(quiet.observe(ms(t0, 500), dir.clone(), S), Step::Read);
        let mut fresh = Settle::starting(dir.clone(), ms(t0, 300));
        assert_eq!(fresh.observe(ms(t0, 500), dir.clone(), S), Step::Settling);
        assert_eq!(fresh.observe(ms(t0, 800), dir, S), Step::Read);
    }

    // CFG-1 under churn: a directory that changes every 100 ms never settles, and is read once
    // it has been changing for MAX_UNSETTLED, then the clock starts again.
    #[test]
    fn a_directory_that_never_settles_is_read_after_the_longest_wait() {
        let t0 = Instant::now();
        let mut settle = Settle::default();
        settle.mark_read(state(&[("a.yaml", 0)], None));
        let max = MAX_UNSETTLED.as_millis() as u64;
        let mut reads = Vec::new();
        for tick in 1..=(2 * max / 100 + 2) {
            let at = tick * 100;
            let now = state(&[("a.yaml", tick)], None);
            if settle.observe(ms(t0, at), now.clone(), S) == Step::Read {
                reads.push(at);
                settle.mark_read(now);
            }
        }
        assert_eq!(reads, [max + 100, 2 * max + 200]);
    }

    #[test]
    fn a_zero_settle_period_reads_every_change_at_once() {
        let mut settle = Settle::default();
        assert_eq!(settle.observe(Instant::now(), state(&[("a.yaml", 1)], None), Duration::ZERO), Step::Read);
    }

    // The I/O around the rule: the marker is read, hidden files are not configuration, and a
    // poll right after a write does not read it.
    #[test]
    fn the_directory_is_fingerprinted_with_its_marker() {
        let dir = std::env::temp_dir().join(format!("strait-source-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").expect("write");
        fs::write(dir.join(".hidden.yaml"), "not: [yaml").expect("write");
        fs::write(dir.join(GENERATION_FILE), "41\n").expect("write");
        let fingerprint = fingerprint(&dir).expect("fingerprint");
        assert_eq!(fingerprint.files.len(), 1);
        assert_eq!(fingerprint.generation.as_deref(), Some("41"));
        let mut watched = ConfigDir::new(&dir);
        assert!(watched.poll().is_none(), "a directory changed just now is not read yet");
        let _ = fs::remove_dir_all(&dir);
    }

    // CFG-1: a directory read through the cache gives what a fresh read gives, after every kind
    // of change (a file edited, one rewritten to the same size, one added, one removed), each
    // file's diagnostics from its own parse.
    #[test]
    fn a_cached_read_equals_a_fresh_read() {
        let dir = std::env::temp_dir().join(format!("strait-source-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        let ns = |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        let bad = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, bogus: 1}\n";
        let summary = |loaded: &Loaded| {
            let origins: Vec<String> = loaded.resources.iter().map(|r| r.origin.to_string()).collect();
            let diagnostics: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
            (origins, diagnostics, loaded.texts.clone())
        };
        let mut cache = ParseCache::default();
        let steps: [(&str, Option<String>); 5] = [
            ("a.yaml", Some(ns("a"))),
            ("b.yaml", Some(bad.to_owned())),
            ("a.yaml", Some(ns("c"))),
            ("c.yaml", Some([ns("d"), "---\n".to_owned(), ns("e")].concat())),
            ("b.yaml", None),
        ];
        for (file, content) in steps {
            // Modification times move in clock ticks of a few milliseconds.
            std::thread::sleep(Duration::from_millis(20));
            match &content {
                Some(text) => fs::write(dir.join(file), text).expect("write"),
                None => fs::remove_file(dir.join(file)).expect("remove"),
            }
            let cached = load_dir_cached(&dir, &mut cache);
            assert_eq!(summary(&cached), summary(&load_dir(&dir)), "after writing {file}");
            assert_eq!(cache.files.len(), cached.texts.len(), "the cache holds the files there are");
        }
        // A file kept from the cache is not read again (a same-size, same-time rewrite is not
        // told apart, exactly as the change detection's fingerprint does not tell it).
        let before = cache.files.get(&dir.join("a.yaml")).map(|p| p.text.as_ptr());
        load_dir_cached(&dir, &mut cache);
        assert_eq!(cache.files.get(&dir.join("a.yaml")).map(|p| p.text.as_ptr()), before);
        let _ = fs::remove_dir_all(&dir);
    }
}
