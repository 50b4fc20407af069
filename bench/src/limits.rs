//! Raising the open-file limit, so `server` and `hold` can carry hundreds of thousands of sockets.
#![allow(unsafe_code)] // getrlimit and setrlimit have no safe wrapper in std.

use std::io;

/// The hard limit tried first: Linux's default `fs.nr_open`, above which setrlimit fails anyway.
const WANTED: libc::rlim_t = 1 << 20;

/// Raises the soft RLIMIT_NOFILE as far as allowed and returns it.
///
/// The hard limit is raised to [`WANTED`] first when the process may (root may); otherwise the
/// soft limit rises to the existing hard one.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_max < WANTED {
        let wanted = libc::rlimit { rlim_cur: WANTED, rlim_max: WANTED };
        // SAFETY: setrlimit only reads the struct. Failing (EPERM when not root) is expected.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
            return Ok(WANTED);
        }
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}
