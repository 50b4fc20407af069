//! Flame graphs from `perf script` text: the stacks folded ("root;…;leaf count", one line per
//! distinct stack, the format `grep` and other flame graph tools read), the functions that hold
//! the most samples, and an SVG drawn with plain strings (no graph library to build).

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
};

/// Identical stacks of one process merged, root first: the thread's name, then its frames
/// outward in; kernel frames end in `_[k]`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Folded {
    pub stacks: BTreeMap<String, u64>,
}

/// Functions and their samples, most first.
pub type Ranking = Vec<(String, u64)>;

/// Frames whose name ends with this ran in the kernel (the suffix other flame graph tools use).
const KERNEL: &str = "_[k]";

/// Folds `perf script` output: samples are separated by blank lines; a sample's first line
/// ("comm tid time: period event:") is not indented, its frames are ("addr symbol+off (dso)"),
/// leaf first. Lines that are neither are skipped, never fatal.
pub fn fold(perf_script: &str) -> Folded {
    let mut folded = Folded::default();
    let mut comm: Option<String> = None;
    let mut frames: Vec<String> = Vec::new();
    for line in perf_script.lines() {
        if line.trim().is_empty() {
            folded.add(comm.take(), &mut frames);
        } else if line.starts_with(char::is_whitespace) {
            if comm.is_some() {
                frames.extend(frame(line));
            }
        } else {
            folded.add(comm.take(), &mut frames);
            comm = Some(thread_name(line));
        }
    }
    folded.add(comm, &mut frames);
    folded
}

/// The thread's name in a sample's first line: the words before its thread id.
fn thread_name(header: &str) -> String {
    let words: Vec<&str> = header.split_whitespace().collect();
    let tid = words.iter().position(|w| !w.is_empty() && w.split('/').all(|p| p.chars().all(|c| c.is_ascii_digit())));
    let name = words[..tid.unwrap_or(1).min(words.len())].join(" ");
    if name.is_empty() { "[unknown thread]".into() } else { name.replace(';', ":") }
}

/// One frame line as its folded name: the symbol without offset or hash, `_[k]` for the
/// kernel, `[libname]` for an address in a library without a symbol.
fn frame(line: &str) -> Option<String> {
    let (address, rest) = line.trim().split_once(char::is_whitespace)?;
    let rest = rest.trim();
    let (symbol, dso) = match rest.rfind(" (") {
        Some(i) if rest.ends_with(')') => (&rest[..i], &rest[i + 2..rest.len() - 1]),
        _ => (rest, ""),
    };
    let symbol = without_offset(symbol);
    if symbol.is_empty() || symbol == "[unknown]" {
        return Some(match dso.rsplit('/').next() {
            Some(lib) if !lib.is_empty() && dso != "[unknown]" => format!("[{lib}]"),
            _ => "[unknown]".into(),
        });
    }
    let kernel = dso.starts_with("[kernel") || (address.len() == 16 && address.starts_with("ffff"));
    let name = clean_symbol(symbol);
    Some(if kernel { format!("{name}{KERNEL}") } else { name })
}

/// "name+0x1f" → "name".
fn without_offset(symbol: &str) -> &str {
    match symbol.rfind("+0x") {
        Some(i) if symbol[i + 3..].chars().all(|c| c.is_ascii_hexdigit()) && i + 3 < symbol.len() => &symbol[..i],
        _ => symbol,
    }
}

/// A demangled Rust symbol without its hash (`::h` and 16 hex digits, which differ between
/// builds and would split one function in two), and no `;`, the folded format's separator.
pub fn clean_symbol(symbol: &str) -> String {
    let mut out = String::with_capacity(symbol.len());
    let mut rest = symbol;
    while let Some(i) = rest.find("::h") {
        let hash = &rest[i + 3..];
        let digits = hash.chars().take_while(char::is_ascii_hexdigit).count();
        let ends_word = !hash[digits..].starts_with(|c: char| c.is_alphanumeric() || c == '_');
        out.push_str(&rest[..i]);
        if digits == 16 && ends_word {
            rest = &hash[16..];
        } else {
            out.push_str("::h");
            rest = hash;
        }
    }
    out.push_str(rest);
    out.trim().replace(';', ":")
}

impl Folded {
    /// Adds one sample (frames leaf first, as perf prints them) and empties `frames`.
    fn add(&mut self, comm: Option<String>, frames: &mut Vec<String>) {
        let Some(comm) = comm else {
            frames.clear();
            return;
        };
        // A DWARF unwind that stops short (the stack copied per sample ends, or a frame without
        // unwind tables) ends in an unknown address: outermost, it says nothing, so it goes
        // and the stack joins its thread's others at the frames that are known.
        while frames.last().is_some_and(|f| f == "[unknown]") {
            frames.pop();
        }
        let mut stack = comm;
        for f in frames.drain(..).rev() {
            stack.push(';');
            stack.push_str(&f);
        }
        *self.stacks.entry(stack).or_default() += 1;
    }

    pub fn samples(&self) -> u64 {
        self.stacks.values().sum()
    }

    /// "root;…;leaf count" lines, sorted.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (stack, n) in &self.stacks {
            let _ = writeln!(out, "{stack} {n}");
        }
        out
    }

    /// The `n` functions with the most samples anywhere on the stack (inclusive, each counted
    /// once per sample however often it recurs), and the `n` with the most samples as the leaf
    /// (self). The thread name at the root is not a function and is left out of both; so are,
    /// from the inclusive list, the runtime's plumbing ([`PLUMBING`]) under every task, which
    /// would fill it at 60–100 % and say nothing.
    pub fn top(&self, n: usize) -> (Ranking, Ranking) {
        let mut inclusive = BTreeMap::<&str, u64>::new();
        let mut leaf = BTreeMap::<&str, u64>::new();
        for (stack, count) in &self.stacks {
            let frames: Vec<&str> = stack.split(';').skip(1).collect();
            for f in frames.iter().copied().filter(|f| !plumbing(f)).collect::<HashSet<_>>() {
                *inclusive.entry(f).or_default() += count;
            }
            *leaf.entry(frames.last().copied().unwrap_or("[no frames]")).or_default() += count;
        }
        (largest(inclusive, n), largest(leaf, n))
    }

    /// Every sample in one area, by where it ran: kernel samples by whether they are the
    /// scheduler, a system call or something else (interrupts, softirq network processing, page
    /// faults); user samples by the innermost frame of a library we can name, so memcpy called
    /// by rustls counts as TLS and malloc called by h2 as allocation. In [`AREAS`] order.
    pub fn areas(&self) -> Vec<(&'static str, u64)> {
        let mut counts = [0u64; AREAS.len()];
        for (stack, n) in &self.stacks {
            counts[area(stack)] += n;
        }
        AREAS.iter().copied().zip(counts).collect()
    }
}

/// Frames every task or thread passes through: thread start, panic catching, closures called
/// through `FnOnce`, the tokio task harness and worker loop, `poll_fn` and `MaybeDone`
/// adapters. Prefixes, matched after any leading `<` or `&`.
pub const PLUMBING: [&str; 18] = [
    "core::panic::",
    "std::panic",
    "core::ops::function::",
    "alloc::boxed::Box<dyn core::ops::function::",
    "core::future::poll_fn::",
    "tokio::future::maybe_done::",
    "tokio::loom::",
    "tokio::runtime::task::",
    "tokio::runtime::context::",
    "tokio::runtime::scheduler::multi_thread::worker::",
    "tokio::runtime::blocking::",
    "tokio::task::coop::",
    "std::thread::",
    "std::sys::backtrace::",
    "std::sys::thread::",
    "start_thread",
    "__GI___clone3",
    "clone3",
];

fn plumbing(frame: &str) -> bool {
    let f = frame.trim_start_matches(['<', '&']);
    PLUMBING.iter().any(|p| f.starts_with(p))
}

/// The areas [`Folded::areas`] sorts samples into.
pub const AREAS: [&str; 9] = [
    "kernel: scheduling (context switches, idle, wake-ups)",
    "kernel: system calls (socket I/O, epoll)",
    "kernel: other (softirq, interrupts, faults)",
    "allocation (malloc, free)",
    "TLS (rustls, ring)",
    "HTTP/2 (h2)",
    "tokio (scheduler, I/O driver, timers)",
    "strait",
    "other user space (std, libc, tracing, …)",
];

fn area(stack: &str) -> usize {
    let frames: Vec<&str> = stack.split(';').skip(1).collect();
    if frames.last().is_some_and(|f| f.ends_with(KERNEL)) {
        return if frames.iter().any(|f| f.starts_with("__schedule") || f.starts_with("schedule_idle")) {
            0
        } else if frames.iter().any(|f| f.starts_with("entry_SYSCALL")) {
            1
        } else {
            2
        };
    }
    for f in frames.iter().rev() {
        let f = f.trim_start_matches('<').trim_start_matches('&');
        if ["malloc", "free", "realloc", "calloc", "cfree", "_int_", "__rust_alloc", "__rust_dealloc"]
            .iter()
            .any(|p| f.starts_with(p))
            || f.starts_with("alloc::alloc::")
        {
            return 3;
        }
        if ["rustls::", "ring::", "ring_core", "tokio_rustls::"].iter().any(|p| f.starts_with(p)) {
            return 4;
        }
        if f.starts_with("h2::") {
            return 5;
        }
        if f.starts_with("tokio::") || f.starts_with("mio::") {
            return 6;
        }
        if f.starts_with("strait::") {
            return 7;
        }
    }
    8
}

fn largest(counts: BTreeMap<&str, u64>, n: usize) -> Ranking {
    let mut all: Vec<(String, u64)> = counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

/// One node of the call tree the SVG draws: samples through it and its callees by name.
#[derive(Default)]
struct Node {
    samples: u64,
    children: BTreeMap<String, Node>,
}

pub const WIDTH: f64 = 1200.0;
const PAD: f64 = 10.0;
const ROW: f64 = 16.0;
const TOP: f64 = 50.0;
/// Frames narrower than this share of all samples are not drawn (nor, being narrower still,
/// their callees): a thousandth of 1,180 px is about one pixel.
const NARROWEST: f64 = 0.001;
/// Average width of a character of the 11 px monospace labels, to cut labels to their frame.
const CHAR: f64 = 6.7;

/// A flame graph of `folded`: x is the share of samples, y the depth from the bottom (the root,
/// "all", spans the whole width); callees sorted by name, so equal profiles draw the same. One
/// `<g>` per frame drawn with a `<title>` (the tooltip: name, samples, share), a `<rect>` and
/// its label cut to fit.
pub fn svg(folded: &Folded, title: &str) -> String {
    let mut root = Node::default();
    for (stack, n) in &folded.stacks {
        root.samples += n;
        let mut node = &mut root;
        for f in stack.split(';') {
            node = node.children.entry(f.to_owned()).or_default();
            node.samples += n;
        }
    }
    let total = root.samples.max(1);
    let depth = depth(&root, total);
    let height = TOP + ROW * depth as f64 + PAD;
    let mut frames = String::new();
    draw(&mut frames, "all", &root, PAD, 0, total, height);
    let mut out = String::new();
    let _ = writeln!(out, r#"<?xml version="1.0" standalone="no"?>"#);
    let _ = writeln!(
        out,
        r##"<svg version="1.1" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" style="background-color:#f4f4f4" font-family="monospace" font-size="11">"##
    );
    let _ =
        writeln!(out, r#"<text x="{}" y="22" text-anchor="middle" font-size="16">{}</text>"#, WIDTH / 2.0, xml(title));
    let _ = writeln!(
        out,
        r##"<text x="{}" y="40" text-anchor="middle" fill="#555">{} samples; width = share of samples, kernel frames blue; hover for counts</text>"##,
        WIDTH / 2.0,
        total
    );
    out.push_str(&frames);
    out.push_str("</svg>\n");
    out
}

/// Rows needed: the deepest frame wide enough to draw, counting the root.
fn depth(node: &Node, total: u64) -> usize {
    1 + node.children.values().filter(|c| wide_enough(c, total)).map(|c| depth(c, total)).max().unwrap_or(0)
}

fn wide_enough(node: &Node, total: u64) -> bool {
    node.samples as f64 / total as f64 >= NARROWEST
}

fn draw(out: &mut String, name: &str, node: &Node, x: f64, level: usize, total: u64, height: f64) {
    let scale = (WIDTH - 2.0 * PAD) / total as f64;
    let width = node.samples as f64 * scale;
    let y = height - PAD - ROW * (level + 1) as f64;
    let share = 100.0 * node.samples as f64 / total as f64;
    let room = ((width - 6.0) / CHAR).floor().max(0.0) as usize;
    let label = match name.chars().count() {
        _ if room < 3 => String::new(),
        len if len <= room => name.to_owned(),
        _ => format!("{}..", name.chars().take(room - 2).collect::<String>()),
    };
    let _ = writeln!(
        out,
        r#"<g><title>{} ({} samples, {share:.2}%)</title><rect x="{x:.2}" y="{y:.1}" width="{width:.2}" height="{:.1}" fill="{}" rx="2"/><text x="{:.2}" y="{:.1}">{}</text></g>"#,
        xml(name),
        node.samples,
        ROW - 1.0,
        colour(name),
        x + 3.0,
        y + ROW - 4.5,
        xml(&label)
    );
    let mut child_x = x;
    for (child_name, child) in &node.children {
        if wide_enough(child, total) {
            draw(out, child_name, child, child_x, level + 1, total, height);
        }
        child_x += child.samples as f64 * scale;
    }
}

/// A colour from the name's hash, so a function has the same colour in every graph: warm for
/// user space, blue for the kernel, so the kernel's share shows at a glance.
fn colour(name: &str) -> String {
    // FNV-1a: stable across runs and Rust versions, unlike the std hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let (a, b, c) =
        ((hash & 0xff) as f64 / 255.0, ((hash >> 8) & 0xff) as f64 / 255.0, ((hash >> 16) & 0xff) as f64 / 255.0);
    let (r, g, bl) = if name.ends_with(KERNEL) {
        (80.0 + 60.0 * a, 150.0 + 60.0 * b, 210.0 + 40.0 * c)
    } else {
        (205.0 + 50.0 * a, 80.0 + 150.0 * b, 30.0 + 40.0 * c)
    };
    format!("rgb({},{},{})", r as u8, g as u8, bl as u8)
}

/// `text` safe inside an XML element or attribute.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `perf script` output captured from strait's node-2 proxy at 1,000 req/s (`perf record
    /// --call-graph dwarf`), 16 samples.
    const SAMPLE: &str = include_str!("../tests/fixtures/perf-script-node2.txt");

    #[test]
    fn samples_fold_root_first_with_kernel_frames_marked() {
        let folded = fold(SAMPLE);
        assert_eq!(folded.samples(), 16);
        assert_eq!(folded.samples(), SAMPLE.matches("cpu-clock").count() as u64);
        // The first sample: a TCP ACK processed in the kernel under a send from h2's writer.
        let first = folded.stacks.keys().find(|s| s.ends_with("tcp_ack_update_rtt_[k]")).expect("the first sample");
        assert!(first.starts_with("tokio-rt-worker;"), "{first}");
        assert!(first.contains(";tcp_ack_[k];tcp_ack_update_rtt_[k]"), "{first}");
        assert!(!first.contains("+0x") && !first.contains("(inlined)"), "{first}");
        // Five samples were taken as the thread came back from a context switch in a syscall;
        // at least two of them with the very same stack, folded into one line.
        let switches: u64 =
            folded.stacks.iter().filter(|(s, _)| s.ends_with(";finish_task_switch.isra.0_[k]")).map(|(_, n)| n).sum();
        assert_eq!(switches, 5);
        assert!(folded.stacks.len() < 16, "identical stacks folded: {} lines", folded.stacks.len());
        // Unknown outermost frames are dropped; none is left at the root end.
        assert!(folded.stacks.keys().all(|s| !s.starts_with("tokio-rt-worker;[unknown]")));
        for line in folded.text().lines() {
            let (stack, n) = line.rsplit_once(' ').expect("stack and count");
            assert!(n.parse::<u64>().is_ok_and(|n| n > 0), "{line}");
            assert_eq!(folded.stacks.get(stack).map(u64::to_string).as_deref(), Some(n));
        }
    }

    #[test]
    fn folding_counts_identical_stacks_and_strips_hashes() {
        let script = "\
strait 10 1.0: 1 cpu-clock:
\tffffffff81000130 entry_SYSCALL_64_after_hwframe+0x76 ([kernel.kallsyms])
\t10aba4 std::io::Write::write_all::h0123456789abcdef+0x64 (/strait)
\t20aba4 main+0x1 (/strait)

strait 10 2.0: 1 cpu-clock:
\tffffffff81000130 entry_SYSCALL_64_after_hwframe+0x76 ([kernel.kallsyms])
\t10aba4 std::io::Write::write_all::hfedcba9876543210+0x64 (/strait)
\t20aba4 main+0x1 (/strait)
\tffffffffffffffff [unknown] ([unknown])
strait 11 3.0: 1 cpu-clock:
\t7f00 [unknown] (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t20aba4 a;b::hashes+0x1 (/strait)
";
        let folded = fold(script);
        assert_eq!(
            folded.text(),
            "strait;a:b::hashes;[libc.so.6] 1\nstrait;main;std::io::Write::write_all;entry_SYSCALL_64_after_hwframe_[k] 2\n"
        );
        assert_eq!(clean_symbol("f::h0123456789abcdefg"), "f::h0123456789abcdefg");
        assert_eq!(clean_symbol("<T as h2::X>::poll::h0123456789abcdef"), "<T as h2::X>::poll");
        let (inclusive, leaf) = folded.top(4);
        let names: Vec<(&str, u64)> = inclusive.iter().map(|(f, n)| (f.as_str(), *n)).collect();
        assert!(plumbing(
            "<core::panic::unwind_safe::AssertUnwindSafe<F> as core::ops::function::FnOnce<()>>::call_once"
        ));
        assert!(
            plumbing("tokio::runtime::task::harness::poll_future")
                && !plumbing("tokio::runtime::io::driver::Driver::turn")
        );
        // Most samples first, ties by name; the thread's name is not a function.
        let syscall = "entry_SYSCALL_64_after_hwframe_[k]";
        assert_eq!(names, [(syscall, 2), ("main", 2), ("std::io::Write::write_all", 2), ("[libc.so.6]", 1)]);
        assert_eq!(leaf[0], ("entry_SYSCALL_64_after_hwframe_[k]".to_string(), 2));
        assert_eq!(folded.areas()[1], (AREAS[1], 2));
    }

    #[test]
    fn areas_cover_every_sample_once() {
        let folded = fold(SAMPLE);
        let areas = folded.areas();
        assert_eq!(areas.iter().map(|(_, n)| n).sum::<u64>(), 16);
        // The five context switches, and the TLS writer's sample (rustls' buffer check).
        assert_eq!(areas[0].1, 5, "{areas:?}");
        assert!(areas[4].1 >= 1, "{areas:?}");
    }

    /// Each `<g>` of the SVG: its title text and its rect's x and width.
    fn frames(svg: &str) -> Vec<(String, f64, f64)> {
        let attr = |el: &str, name: &str| -> f64 {
            let start = el.find(&format!(" {name}=\"")).expect("attribute") + name.len() + 3;
            el[start..].split('"').next().and_then(|v| v.parse().ok()).expect("a number")
        };
        svg.split("<g>")
            .skip(1)
            .map(|g| {
                let title = g.split("<title>").nth(1).and_then(|t| t.split("</title>").next()).expect("title");
                let rect = g.split("<rect").nth(1).expect("rect");
                (title.to_owned(), attr(rect, "x"), attr(rect, "width"))
            })
            .collect()
    }

    /// Every element opened is closed, in order; self-closing ones count as both.
    fn balanced(svg: &str) -> bool {
        let mut open: Vec<&str> = Vec::new();
        for tag in svg.split('<').skip(1).map(|t| t.split('>').next().unwrap_or("")) {
            if tag.starts_with('?') || tag.ends_with('/') {
                continue;
            }
            let name = tag.trim_start_matches('/').split_whitespace().next().unwrap_or("");
            if tag.starts_with('/') {
                if open.pop() != Some(name) {
                    return false;
                }
            } else {
                open.push(name);
            }
        }
        open.is_empty()
    }

    #[test]
    fn svg_is_well_formed_with_one_rect_per_frame_kept() {
        let folded = fold(SAMPLE);
        let svg = svg(&folded, "node 2 <mesh> & co");
        assert!(balanced(&svg), "{svg}");
        assert!(svg.contains("node 2 &lt;mesh&gt; &amp; co"));
        // Frames of the call tree: every distinct prefix of a stack, plus the root; none is
        // below 0.1 % of 16 samples, so all are kept.
        let mut prefixes = HashSet::new();
        for stack in folded.stacks.keys() {
            let parts: Vec<&str> = stack.split(';').collect();
            for i in 1..=parts.len() {
                prefixes.insert(parts[..i].join(";"));
            }
        }
        assert_eq!(svg.matches("<rect").count(), prefixes.len() + 1);
        assert_eq!(svg.matches("<text").count(), svg.matches("<rect").count() + 2);
        let drawn = frames(&svg);
        assert_eq!(drawn[0].0, "all (16 samples, 100.00%)");
        assert!((drawn[0].2 - (WIDTH - 2.0 * PAD)).abs() < 0.01);
        assert!(!svg.contains("(inlined)") && !svg.contains("+0x"));
    }

    #[test]
    fn widths_are_proportional_and_thin_frames_are_dropped() {
        let mut folded = Folded::default();
        folded.stacks.insert("t;a;b".into(), 600);
        folded.stacks.insert("t;a;c".into(), 300);
        folded.stacks.insert("t;d".into(), 99_099);
        // 1 sample of 100,000: under 0.1 %, not drawn, but counted in the root and `t`.
        folded.stacks.insert("t;e<'x'>".into(), 1);
        let svg = svg(&folded, "t");
        assert!(balanced(&svg));
        let drawn = frames(&svg);
        let names: Vec<&str> = drawn.iter().map(|(t, _, _)| t.split(' ').next().unwrap_or("")).collect();
        assert_eq!(names, ["all", "t", "a", "b", "c", "d"]);
        let width = |name: &str| drawn.iter().find(|(t, _, _)| t.starts_with(&format!("{name} "))).expect(name).2;
        let full = WIDTH - 2.0 * PAD;
        assert!((width("b") - 2.0 * width("c")).abs() < 0.02);
        assert!((width("a") - full * 900.0 / 100_000.0).abs() < 0.02);
        assert!((width("t") - full).abs() < 0.02);
        // Callees start where their caller starts, one after the other in name order.
        let x = |name: &str| drawn.iter().find(|(t, _, _)| t.starts_with(&format!("{name} "))).expect(name).1;
        assert!((x("b") - x("a")).abs() < 0.01 && (x("c") - (x("b") + width("b"))).abs() < 0.02);
        assert!(drawn.iter().any(|(t, _, _)| t == "b (600 samples, 0.60%)"));
    }
}
