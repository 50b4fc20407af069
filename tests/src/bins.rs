//! Finding the project's binaries (`strait`, `strait-echo`) from tests and from `strait demo`.
//!
//! `cargo test` runs integration tests from `target/<profile>/deps/`, next to which cargo puts
//! the binaries; the demo runs from `target/<profile>/` itself. `STRAIT_BIN_DIR` overrides both,
//! e.g. for binaries installed elsewhere.

use std::env;
use std::io;
use std::path::{Path, PathBuf};

/// Where binary `name` should be. It may not exist; see [`require_bin`].
pub fn bin_path(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Like [`bin_path`], but fails with a hint when the binary has not been built.
pub fn require_bin(name: &str) -> io::Result<PathBuf> {
    let path = bin_path(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "binary {name} not found at {} (build it first: cargo build --bins; \
                 or point STRAIT_BIN_DIR at its directory)",
                path.display()
            ),
        ))
    }
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = env::var_os("STRAIT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = env::current_exe().unwrap_or_default();
    dir_of_exe(&exe)
}

/// The directory holding `exe`, or its parent when that is cargo's `deps` dir.
fn dir_of_exe(exe: &Path) -> PathBuf {
    let dir = exe.parent().unwrap_or(Path::new("."));
    match dir.file_name() {
        Some(last) if last == "deps" => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deps_dir_maps_to_its_parent() {
        assert_eq!(dir_of_exe(Path::new("/t/target/debug/deps/harness-1234")), Path::new("/t/target/debug"));
        assert_eq!(dir_of_exe(Path::new("/t/target/debug/strait")), Path::new("/t/target/debug"));
    }
}
