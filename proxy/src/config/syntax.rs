//! YAML syntax errors in words (CFG-1): libyaml's messages ("did not find expected key",
//! "mapping values are not allowed in this context") name the parser's state, not the user's
//! mistake. Looking at the text around the error tells which mistake it was: a tab, a line
//! indented out of step with its siblings, a `: ` inside a value, a quote never closed...
//!
//! Also here: indentation made of non-breaking spaces (U+00A0), which text copied from a web page
//! often has. YAML reads them as content, so such a file would otherwise fail with one of the
//! messages above; as a non-breaking space is one column like a space, reading it as a space
//! is unambiguous, and the user is told.

use std::borrow::Cow;

/// A syntax error explained: the 1-based line of the document it is on, and what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct Explained {
    pub line: usize,
    pub message: String,
}

/// Explains libyaml's `message` (as serde_yaml_ng formats it, positions relative to `doc`), or
/// `None` when it is not a syntax error (a missing field, a wrong type...).
pub fn explain(message: &str, doc: &str) -> Option<Explained> {
    let marks = marks(message);
    let (line, column) = marks.first().copied()?;
    let context = marks.get(1).copied();
    let lines: Vec<&str> = doc.lines().collect();
    let text = |l: usize| lines.get(l.wrapping_sub(1)).copied().unwrap_or("");
    let problem = message.split(" at line ").next().unwrap_or(message);
    let known = [
        "found character that cannot start any token",
        "found a tab character",
        "mapping values are not allowed",
        "did not find expected",
        "could not find expected ':'",
        "found unexpected end of stream",
        "found unknown escape character",
        "block sequence entries are not allowed",
        "found undefined tag handle",
    ];
    if !known.iter().any(|k| problem.starts_with(k)) {
        return None;
    }
    // A tab in the indentation, on the error's line or the one before: libyaml reports it as
    // any of several problems depending on what follows it.
    let tab_line = (line.saturating_sub(1).max(1)..=line).find(|l| indentation(text(*l)).contains('\t'));
    if let Some(tab_line) = tab_line {
        return Some(Explained {
            line: tab_line,
            message: "this line is indented with a tab; YAML indents with spaces only".into(),
        });
    }
    let at = |l: usize, message: String| Some(Explained { line: l, message });
    let here = text(line);
    let indent = |l: &str| l.len() - l.trim_start_matches(' ').len();
    if problem.starts_with("found character that cannot start any token") {
        let c = here.chars().nth(column.saturating_sub(1)).unwrap_or(' ');
        return at(line, format!("a plain value cannot start with `{c}`; put the value in quotes"));
    }
    if problem.starts_with("mapping values are not allowed") {
        let value = here.split_once(": ").map(|(_, v)| v.trim()).unwrap_or("");
        if value.contains(": ") && !value.starts_with(['"', '\'', '{', '[']) {
            return at(
                line,
                format!("the value `{value}` contains `: `, which YAML reads as another key; put the value in quotes"),
            );
        }
        let above = (1..line).rev().map(text).find(|l| !is_blank(l)).unwrap_or("");
        return at(
            line,
            format!(
                "this line is indented by {} spaces, deeper than the line above ({} spaces), which already has a \
                 value; align it with its sibling keys, or remove the value above to nest it",
                indent(here),
                indent(above)
            ),
        );
    }
    if problem.starts_with("found unexpected end of stream") && message.contains("quoted scalar") {
        let (open, col) = context.unwrap_or((line, column));
        let quote = text(open).chars().nth(col.saturating_sub(1)).filter(|c| *c == '\'' || *c == '"').unwrap_or('"');
        return at(open, format!("the string opened with {quote} on this line is never closed"));
    }
    if problem.starts_with("did not find expected ',' or") {
        let (open, col) = context.unwrap_or((line, column));
        let bracket = text(open).chars().nth(col.saturating_sub(1)).unwrap_or('[');
        return at(
            line,
            format!("the `{bracket}` opened on line {open} is not closed, or a `,` is missing between its entries"),
        );
    }
    if problem.starts_with("did not find expected key") || problem.starts_with("did not find expected '-'") {
        let what = if here.trim_start().starts_with("- ") { "list item" } else { "line" };
        let siblings = context.map(|(l, c)| (l, c.saturating_sub(1)));
        return at(
            line,
            match siblings {
                Some((from, column)) => format!(
                    "this {what} is indented by {} spaces, out of step with the block it is in (from line {from}, \
                     indented by {column}); lines of one block start at the same column",
                    indent(here)
                ),
                None => format!("this {what} is indented by {} spaces, out of step with the lines above", indent(here)),
            },
        );
    }
    if problem.starts_with("could not find expected ':'") {
        let key_line = context.map_or(line, |(l, _)| l);
        return at(
            key_line,
            format!(
                "`{}` is followed by more indented lines, so YAML reads it as a key, but it has no `:` (write \
                 `key: value` or `key:` with the value indented below)",
                text(key_line).trim()
            ),
        );
    }
    if problem.starts_with("found unknown escape character") {
        return at(
            line,
            "unknown escape sequence in a double-quoted string; write `\\\\` for a backslash, or use single quotes"
                .into(),
        );
    }
    if problem.starts_with("block sequence entries are not allowed") {
        return at(
            line,
            "a list item `- ` cannot follow `key:` on the same line: start it on the next line, indented under \
             its key (or write `[a, b]`)"
                .into(),
        );
    }
    at(line, format!("YAML syntax error: {problem}"))
}

/// Every "line L column C" mark in a libyaml message: the problem first, then its context.
fn marks(message: &str) -> Vec<(usize, usize)> {
    let mut marks = Vec::new();
    for part in message.split(" at line ").skip(1) {
        let mut words = part.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty());
        let line = words.next().and_then(|w| w.parse().ok());
        let column = part
            .split_once("column ")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next().and_then(|w| w.parse().ok()));
        if let (Some(line), Some(column)) = (line, column) {
            marks.push((line, column));
        }
    }
    marks
}

fn indentation(line: &str) -> &str {
    let end = line.find(|c: char| c != ' ' && c != '\t').unwrap_or(line.len());
    &line[..end]
}

fn is_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// Reads non-breaking spaces in indentation (before a line's first character that is not a
/// space or a list dash) as spaces. Returns the text and the 1-based lines that had them.
pub fn normalize_indentation(text: &str) -> (Cow<'_, str>, Vec<usize>) {
    if !text.contains('\u{a0}') {
        return (Cow::Borrowed(text), Vec::new());
    }
    let mut out = String::with_capacity(text.len());
    let mut lines = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let content = line.find(|c: char| !matches!(c, ' ' | '\u{a0}' | '-')).unwrap_or(line.len());
        let (prefix, rest) = line.split_at(content);
        if prefix.contains('\u{a0}') {
            lines.push(index + 1);
            out.extend(prefix.chars().map(|c| if c == '\u{a0}' { ' ' } else { c }));
        } else {
            out.push_str(prefix);
        }
        out.push_str(rest);
    }
    (Cow::Owned(out), lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What serde_yaml_ng says about `doc`, explained.
    fn explained(doc: &str) -> Explained {
        let error = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(doc).expect_err("a syntax error");
        explain(&error.to_string(), doc).unwrap_or_else(|| panic!("not explained: {error}"))
    }

    #[test]
    fn each_common_mistake_is_said_in_words() {
        let cases = [
            ("kind: Pod\nmetadata:\n\tname: x\n", 3, "indented with a tab"),
            ("kind: Pod\nmetadata:\n  name: x\n\tnamespace: y\n", 4, "indented with a tab"),
            ("kind: Pod\nmetadata:\n  name: x\n    namespace: y\n", 4, "deeper than the line above (2 spaces)"),
            ("kind: Pod\nmetadata:\n  name: a: b\n", 3, "contains `: `, which YAML reads as another key"),
            ("kind: Pod\nmetadata:\n    name: x\n  namespace: y\n", 4, "indented by 2 spaces, out of step"),
            ("spec:\n  hosts:\n    - a\n  - b\n", 4, "this list item is indented by 2 spaces"),
            ("kind: Pod\nmetadata:\n  name: \"abc\n  namespace: y\n", 3, "string opened with \" on this line"),
            ("kind: Pod\nmetadata:\n  name: 'abc\n", 3, "string opened with ' on this line"),
            ("kind: Pod\nmetadata: {name: x\nspec: {}\n", 3, "the `{` opened on line 2 is not closed"),
            ("kind: Pod\nhosts: [a, b\nspec: {}\n", 3, "the `[` opened on line 2 is not closed"),
            ("kind: Pod\nmetadata\n  name: x\n", 2, "`metadata` is followed by more indented lines"),
            ("kind: @Pod\n", 1, "cannot start with `@`"),
            ("kind: \"a\\qb\"\n", 1, "unknown escape sequence"),
            ("kind: Pod\nhosts: - a\n", 2, "cannot follow `key:` on the same line"),
        ];
        for (doc, line, words) in cases {
            let e = explained(doc);
            assert_eq!(e.line, line, "{doc:?}: {e:?}");
            assert!(e.message.contains(words), "{doc:?}: {}", e.message);
        }
    }

    #[test]
    fn data_errors_are_not_syntax_errors() {
        assert_eq!(
            explain("spec.ports[0].port: invalid type: string \"x\", expected u16 at line 3 column 9", ""),
            None
        );
        assert_eq!(explain("metadata: missing field `name`", ""), None);
    }

    #[test]
    fn non_breaking_spaces_in_indentation_read_as_spaces() {
        let (text, lines) = normalize_indentation("a:\n\u{a0} b: 1\n\u{a0} \u{a0} - c\u{a0}d\nplain: x\n");
        assert_eq!(text, "a:\n  b: 1\n    - c\u{a0}d\nplain: x\n");
        assert_eq!(lines, [2, 3]);
        let (text, lines) = normalize_indentation("a: 1\n");
        assert!(matches!(text, Cow::Borrowed(_)) && lines.is_empty());
    }
}
