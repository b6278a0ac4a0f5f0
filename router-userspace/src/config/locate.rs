//! From key paths to lines: the span-preserving document the config was
//! parsed into, walked by key path, so every error names its line and key.

use std::{fmt, ops::Range};

use toml_edit::{ImDocument, Item, Table, Value};

use super::ConfigError;

/// Error messages from the parsers may span lines; ours are one line each.
pub(super) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The config text and its name, for turning offsets into lines.
#[derive(Clone, Debug)]
pub(super) struct Source {
    pub(super) origin: String,
    pub(super) text: String,
}

impl Source {
    pub(super) fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(super) fn column_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        let line_start = self.text.as_bytes()[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        end - line_start + 1
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// A path like `service[0].backend[1].address`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct KeyPath(pub(super) Vec<Seg>);

impl KeyPath {
    pub(super) fn key(&self, k: &str) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    pub(super) fn index(&self, i: usize) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    /// Parses the `Display` form back. Only bare keys occur in this schema,
    /// so no quoting is handled.
    pub(super) fn parse(s: &str) -> KeyPath {
        let mut path = KeyPath::default();
        for part in s.split('.') {
            let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
            if !name.is_empty() {
                path.0.push(Seg::Key(name.to_owned()));
            }
            while let Some((idx, tail)) = rest.split_once(']') {
                if let Ok(i) = idx.parse() {
                    path.0.push(Seg::Index(i));
                }
                rest = tail.strip_prefix('[').unwrap_or(tail);
            }
        }
        path
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A position in the span-preserving document.
#[derive(Clone, Copy)]
pub(super) enum Node<'a> {
    Table(&'a Table),
    Inline(&'a toml_edit::InlineTable),
    Array(&'a toml_edit::Array),
    Tables(&'a toml_edit::ArrayOfTables),
    Leaf,
}

impl<'a> Node<'a> {
    pub(super) fn of_item(item: &'a Item) -> Node<'a> {
        match item {
            Item::Table(t) => Node::Table(t),
            Item::ArrayOfTables(a) => Node::Tables(a),
            Item::Value(v) => Node::of_value(v),
            Item::None => Node::Leaf,
        }
    }

    pub(super) fn of_value(value: &'a Value) -> Node<'a> {
        match value {
            Value::Array(a) => Node::Array(a),
            Value::InlineTable(t) => Node::Inline(t),
            _ => Node::Leaf,
        }
    }

    /// Follows one path segment; returns the child and the span that best
    /// marks it (a key's own span, so multi-line values point at the key).
    pub(super) fn step(self, seg: &Seg) -> Option<(Node<'a>, Option<Range<usize>>)> {
        match (self, seg) {
            (Node::Table(t), Seg::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                Some((Node::of_item(item), key.span().or_else(|| item.span())))
            }
            (Node::Inline(t), Seg::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                Some((Node::of_item(item), key.span().or_else(|| item.span())))
            }
            (Node::Tables(a), Seg::Index(i)) => {
                let t = a.get(*i)?;
                Some((Node::Table(t), t.span()))
            }
            (Node::Array(a), Seg::Index(i)) => {
                let v = a.get(*i)?;
                Some((Node::of_value(v), v.span()))
            }
            _ => None,
        }
    }
}

/// Offset of the deepest node along `path` that the document has, so a
/// missing key is reported at its enclosing table.
pub(super) fn locate(doc: &ImDocument<String>, path: &KeyPath) -> Option<usize> {
    let mut node = Node::Table(doc.as_table());
    let mut best = None;
    for seg in &path.0 {
        let Some((next, span)) = node.step(seg) else {
            break;
        };
        if let Some(span) = span {
            best = Some(span.start);
        }
        node = next;
    }
    best
}

/// One child of a container: its segment, its key's span (tables only),
/// the child itself and the child's span.
pub(super) type Entry<'a> = (Seg, Option<Range<usize>>, Node<'a>, Option<Range<usize>>);

/// The key path of the innermost key or value whose span covers `target`,
/// used to name the key in serde errors, which come with a span but no
/// path. Whole-span containment matters: a missing-field error spans its
/// whole table, and must not be pinned on the table's first key.
pub(super) fn path_at(doc: &ImDocument<String>, target: Range<usize>) -> Option<KeyPath> {
    pub(super) fn covers(span: Option<Range<usize>>, target: &Range<usize>) -> bool {
        span.is_some_and(|s| s.start <= target.start && target.end <= s.end.max(s.start + 1))
    }

    pub(super) fn walk<'a>(
        path: &KeyPath,
        target: &Range<usize>,
        entries: &mut dyn Iterator<Item = Entry<'a>>,
    ) -> Option<KeyPath> {
        for (seg, key_span, child, child_span) in entries {
            let here = match &seg {
                Seg::Key(k) => path.key(k),
                Seg::Index(i) => path.index(*i),
            };
            if covers(key_span, target) {
                return Some(here);
            }
            // A table's span does not cover its sub-tables, so look inside
            // every container before settling for the container itself.
            if let Some(found) = search(child, &here, target) {
                return Some(found);
            }
            if covers(child_span, target) {
                return Some(here);
            }
        }
        None
    }

    pub(super) fn search(node: Node<'_>, path: &KeyPath, target: &Range<usize>) -> Option<KeyPath> {
        match node {
            Node::Table(t) => walk(
                path,
                target,
                &mut t.iter().filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    Some((
                        Seg::Key(k.to_owned()),
                        key.span(),
                        Node::of_item(item),
                        item.span(),
                    ))
                }),
            ),
            Node::Inline(t) => walk(
                path,
                target,
                &mut t.iter().filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    Some((
                        Seg::Key(k.to_owned()),
                        key.span(),
                        Node::of_item(item),
                        item.span(),
                    ))
                }),
            ),
            Node::Tables(a) => walk(
                path,
                target,
                &mut a
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (Seg::Index(i), None, Node::Table(t), t.span())),
            ),
            Node::Array(a) => walk(
                path,
                target,
                &mut a
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (Seg::Index(i), None, Node::of_value(v), v.span())),
            ),
            Node::Leaf => None,
        }
    }

    // toml reports errors about the document as a whole (a missing
    // top-level table) with an empty span, which would match anything.
    if target.is_empty() {
        return None;
    }
    search(Node::Table(doc.as_table()), &KeyPath::default(), &target)
}

/// Turns key paths into located errors during validation.
pub(super) struct Locator<'a> {
    pub(super) source: &'a Source,
    pub(super) doc: &'a ImDocument<String>,
}

impl Locator<'_> {
    pub(super) fn err(&self, path: &KeyPath, message: impl ToString) -> ConfigError {
        ConfigError::Invalid {
            origin: self.source.origin.clone(),
            line: self.line(path),
            key: path.to_string(),
            message: message.to_string(),
        }
    }

    pub(super) fn line(&self, path: &KeyPath) -> usize {
        self.source.line_of(locate(self.doc, path).unwrap_or(0))
    }
}
