//! Names of namespaces, interfaces and log files.
//!
//! Network namespace names are files in `/run/netns`, shared by every test process on the machine,
//! so each topology gets a prefix that embeds the owning pid (`st<pid>x<n>`): a later run can then
//! tell a crashed run's leftovers from a live run's namespaces. Pure functions, tested below.

/// Longest namespace name we create: they show up in `ip netns list` and error messages, and
/// short names keep those readable.
pub const MAX_NETNS_NAME: usize = 40;

/// How many characters of the test name go into the prefix: enough to recognise the test in
/// `ip netns list`, few enough to leave room for node and pod names.
const TAG_LEN: usize = 8;

/// The prefix shared by all namespaces of one topology: `st<pid>x<counter>-<tag>`.
///
/// The tag follows a `-` so that a tag starting with a digit cannot blend into the counter and
/// make two topologies' prefixes equal.
pub fn topology_prefix(pid: u32, counter: u32, test_name: &str) -> String {
    let tag = test_tag(test_name);
    if tag.is_empty() { format!("st{pid}x{counter}") } else { format!("st{pid}x{counter}-{tag}") }
}

/// A short alphanumeric tag from a test name; only the last `::` segment matters because the
/// module path is the same for every test in a file.
fn test_tag(test_name: &str) -> String {
    let last = test_name.rsplit("::").next().unwrap_or(test_name);
    last.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).take(TAG_LEN).collect()
}

/// The namespace name for a node or pod: `<prefix>-<sanitized name>`, cut to
/// [`MAX_NETNS_NAME`]. Callers must check the result is unique (cutting may merge names).
pub fn netns_name(prefix: &str, name: &str) -> String {
    let room = MAX_NETNS_NAME.saturating_sub(prefix.len() + 1).max(1);
    let mut part = sanitize(name);
    part.truncate(room);
    format!("{prefix}-{part}")
}

/// Lowercase ASCII letters, digits and `-`; anything else becomes `-`, which is safe both in
/// file names and in sysctl paths (no `.` or `/`).
pub fn sanitize(name: &str) -> String {
    let cleaned: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() { "x".to_string() } else { trimmed.to_string() }
}

/// The log file name for a process named `name`: the name itself, so tests can compute the
/// path, except for characters a file name cannot hold.
pub fn log_file_name(name: &str) -> String {
    let name: String = name.chars().map(|c| if c == '/' || c == '\0' { '-' } else { c }).collect();
    match name.as_str() {
        "" | "." | ".." => format!("process{name}.log"),
        _ => format!("{name}.log"),
    }
}

/// The pid that created a namespace or temp dir named `st<pid>x...`, if the name is ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("st")?;
    let digits_end = rest.find(|c: char| !c.is_ascii_digit())?;
    if digits_end == 0 || !rest[digits_end..].starts_with('x') {
        return None;
    }
    rest[..digits_end].parse().ok()
}

/// The start time (clock ticks since boot) from the text of `/proc/<pid>/stat`.
///
/// Field 2 (the command) may contain spaces and parentheses, so fields are counted from the
/// last `)`; the start time is field 22 overall, the 20th after the command.
pub fn start_time_from_stat(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_embeds_pid_counter_and_tag() {
        assert_eq!(topology_prefix(4242, 7, "harness::two_nodes_talk"), "st4242x7-twonodes");
        assert_eq!(topology_prefix(1, 0, "::"), "st1x0");
        assert_eq!(topology_prefix(1, 1, "2abc"), "st1x1-2abc");
        assert_ne!(topology_prefix(1, 1, "2abc"), topology_prefix(1, 12, "abc"));
    }

    #[test]
    fn netns_names_stay_short_and_clean() {
        let prefix = topology_prefix(4_194_304, 99_999, "a_very_long_test_name_indeed");
        let name = netns_name(&prefix, "Some Pod/Name.With.Dots-and-more-and-more");
        assert!(name.len() <= MAX_NETNS_NAME, "{name}");
        assert!(name.starts_with(&prefix));
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{name}");
        assert_eq!(netns_name("st1x0", "client"), "st1x0-client");
    }

    #[test]
    fn sanitize_never_returns_empty() {
        assert_eq!(sanitize("Node_1"), "node-1");
        assert_eq!(sanitize("..."), "x");
        assert_eq!(sanitize("-a-"), "a");
    }

    #[test]
    fn log_names_are_kept_unless_unsafe() {
        assert_eq!(log_file_name("strait-Node_1"), "strait-Node_1.log");
        assert_eq!(log_file_name("a/b"), "a-b.log");
        assert_eq!(log_file_name(".."), "process...log");
    }

    #[test]
    fn owner_pid_only_for_our_names() {
        assert_eq!(owner_pid("st123x4-foo-node1"), Some(123));
        assert_eq!(owner_pid("st123x"), Some(123));
        assert_eq!(owner_pid("stx1"), None);
        assert_eq!(owner_pid("st123"), None);
        assert_eq!(owner_pid("st12a"), None);
        assert_eq!(owner_pid("spikeA"), None);
        assert_eq!(owner_pid("strait-testbed"), None);
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        assert_eq!(start_time_from_stat(stat), Some(987_654));
        assert_eq!(start_time_from_stat("garbage"), None);
    }
}
