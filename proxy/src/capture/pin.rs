//! Pinning in bpffs (CAP-6): the maps outlive the process, so a restarted or upgraded
//! `strait node` finds the pods' states, policies and counters as it left them.

use std::{ffi::CString, fs, io, path::Path};

use tracing::info;

/// `statfs` magic of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `dir` is on a BPF file system, mounting one at /sys/fs/bpf if none is, and exists.
pub fn prepare(dir: &Path) -> io::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !is_bpffs(root) {
        fs::create_dir_all(root)?;
        let (source, target, fstype) = (cstr("bpf")?, cstr("/sys/fs/bpf")?, cstr("bpf")?);
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(io::Error::other(format!(
                "cannot mount the BPF file system on /sys/fs/bpf: {}",
                io::Error::last_os_error()
            )));
        }
        info!("mounted the BPF file system on /sys/fs/bpf");
    }
    fs::create_dir_all(dir)?;
    if !is_bpffs(dir) {
        return Err(io::Error::other(format!("{} is not on a BPF file system (bpffs)", dir.display())));
    }
    Ok(())
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(io::Error::other)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(path) = cstr(&path.to_string_lossy()) else { return false };
    // SAFETY: statfs fills the zeroed struct for a valid path string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0) && stat.f_type == BPF_FS_MAGIC
}

/// Removes every pin under `dir`.
pub fn remove_all(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}
