//! Where each field of a document is written, so that a problem found after parsing (by
//! `model::compile`, or about a kind strait ignores) points at the field's own line rather than
//! at the document's first line (CFG-1).
//!
//! serde_yaml_ng keeps no positions once a value is deserialized, so the document is read a
//! second time as YAML events, which carry line numbers. This happens only for the documents a
//! diagnostic is about, never on the hot path of a clean reload.

use std::{collections::HashMap, path::Path};

use saphyr_parser::{Event, Parser};

use super::Diagnostic;
use super::parse::split_documents;

/// Dotted field paths (`spec.rules[0].from[0].source.principals`, the form serde_yaml_ng and
/// `compile` name fields with) to the 1-based line, in the file, where each is written.
#[derive(Debug, Default)]
pub struct FieldLines {
    lines: HashMap<String, usize>,
}

impl FieldLines {
    /// Indexes one document whose text starts on line `first_line` of its file. A document that
    /// is not valid YAML gives an index of what was read before the error.
    pub fn index(doc: &str, first_line: usize) -> Self {
        let mut index = Self::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(doc);
        while let Some(Ok((event, span))) = parser.next_event() {
            let line = first_line + span.start.line().saturating_sub(1);
            match event {
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    let path = index.node(&mut stack, line, None);
                    stack.push(match event {
                        Event::MappingStart(..) => Frame::Map { path, key: None },
                        _ => Frame::Seq { path, next: 0 },
                    });
                }
                Event::Scalar(text, ..) => {
                    index.node(&mut stack, line, Some(&text));
                }
                Event::Alias(_) => {
                    index.node(&mut stack, line, None);
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                _ => {}
            }
        }
        index
    }

    /// Records a node (a key, a value or a sequence item) at `line` and returns the path of the
    /// value it is, for a collection that starts here. `scalar` is the text of a scalar node.
    fn node(&mut self, stack: &mut [Frame], line: usize, scalar: Option<&str>) -> Option<String> {
        let Some(top) = stack.last_mut() else { return Some(String::new()) };
        match top {
            Frame::Map { path: None, .. } => None,
            Frame::Map { path: Some(path), key } => match key.take() {
                // A value: its key's line is already recorded.
                Some(key) => Some(join(path, &key)),
                None => {
                    // A key. A non-scalar key (rare; `? [a, b]`) names nothing a diagnostic can.
                    let text = scalar.map_or_else(|| "?".to_owned(), str::to_owned);
                    self.lines.entry(join(path, &text)).or_insert(line);
                    *key = Some(text);
                    None
                }
            },
            Frame::Seq { path: None, .. } => None,
            Frame::Seq { path: Some(path), next } => {
                let item = format!("{path}[{next}]");
                *next += 1;
                self.lines.entry(item.clone()).or_insert(line);
                Some(item)
            }
        }
    }

    /// The line of `field`, or of its closest ancestor written in the document.
    pub fn line_of(&self, field: &str) -> Option<usize> {
        let mut path = field;
        loop {
            if let Some(line) = self.lines.get(path) {
                return Some(*line);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

/// An open collection while walking the events. `path` is `None` inside a complex key, whose
/// content no field path can name.
enum Frame {
    Map { path: Option<String>, key: Option<String> },
    Seq { path: Option<String>, next: usize },
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// Moves every diagnostic about a document of `file` (whose text is `text`) that names a field
/// from the document's first line to the line where that field is written.
pub fn locate(diagnostics: &mut [Diagnostic], file: &Path, text: &str) {
    let mut documents: Option<HashMap<usize, FieldLines>> = None;
    for d in diagnostics.iter_mut().filter(|d| d.origin.file == file) {
        let Some(field) = d.field.as_deref() else { continue };
        let documents = documents.get_or_insert_with(|| {
            split_documents(text).into_iter().map(|(line, doc)| (line, FieldLines::index(doc, line))).collect()
        });
        if let Some(line) = documents.get(&d.origin.line).and_then(|index| index.line_of(field)) {
            d.origin.line = line;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Origin;

    const POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
  annotations:
    istio.io/dry-run: maybe
spec:
  selector:
    matchLabels: {app: web}
  rules:
  - from:
    - source:
        principals:
        - a
        - b
    to:
    - operation: {ports: [\"80\"]}
  - when:
    - key: source.ip
      values: [\"10.0.0.1\"]
";

    #[test]
    fn fields_map_to_their_own_lines() {
        let index = FieldLines::index(POLICY, 10);
        let line = |field: &str| index.line_of(field).map(|l| l - 9);
        assert_eq!(line("kind"), Some(2));
        assert_eq!(line("metadata.annotations.istio.io/dry-run"), Some(6));
        assert_eq!(line("spec.selector.matchLabels"), Some(9));
        assert_eq!(line("spec.selector.matchLabels.app"), Some(9));
        assert_eq!(line("spec.rules[0].from[0].source.principals"), Some(13));
        assert_eq!(line("spec.rules[0].from[0].source.principals[1]"), Some(15));
        assert_eq!(line("spec.rules[0].to[0].operation.ports[0]"), Some(17));
        assert_eq!(line("spec.rules[1].when[0].values[0]"), Some(20));
        assert_eq!(line("spec.rules[1]"), Some(18));
        // Not written: the closest ancestor that is.
        assert_eq!(line("spec.rules[0].from[0].source.notPrincipals"), Some(12));
        assert_eq!(line("spec.provider.name"), Some(7));
        assert_eq!(line("status"), None);
    }

    #[test]
    fn broken_documents_index_what_precedes_the_error() {
        let index = FieldLines::index("kind: Pod\nmetadata:\n  name: [unclosed\n", 1);
        assert_eq!(index.line_of("kind"), Some(1));
        assert_eq!(index.line_of("metadata"), Some(2));
    }

    #[test]
    fn diagnostics_move_to_the_field_line_of_their_document() {
        let text = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\n{POLICY}");
        let file = Path::new("f.yaml");
        let mut diagnostics = vec![
            Diagnostic::warning(Origin::new(file, 6), Some("spec.selector.matchLabels"), "x"),
            Diagnostic::warning(Origin::new(file, 1), Some("metadata.name"), "x"),
            Diagnostic::warning(Origin::new(file, 6), None, "no field: stays"),
            Diagnostic::warning(Origin::new(Path::new("other.yaml"), 6), Some("kind"), "other file: stays"),
        ];
        locate(&mut diagnostics, file, &text);
        let lines: Vec<usize> = diagnostics.iter().map(|d| d.origin.line).collect();
        assert_eq!(lines, [14, 4, 6, 6]);
    }
}
