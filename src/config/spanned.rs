//! A YAML document as a tree whose every node knows its line and column.
//!
//! serde's YAML deserializers report the position of the *first* syntax or
//! type error only; a shard map's semantic errors (a table naming an unknown
//! function, overlapping ranges…) need the position of arbitrary nodes, and
//! `shardgate check` reports *all* errors at once. So the loader reads the
//! event stream of `yaml-rust2`, keeps each node's mark, and the typed reader
//! in `reader.rs` walks this tree.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in the source text, 1-based like editors show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl Mark {
    fn from_marker(marker: &Marker) -> Mark {
        Mark {
            line: marker.line(),
            column: marker.col() + 1,
        }
    }
}

/// A YAML node with its position.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    pub mark: Mark,
}

#[derive(Debug, Clone)]
pub enum NodeKind {
    /// A scalar; `plain` is false for quoted and block scalars, which are
    /// always strings (`"5"` is text, `5` is a number).
    Scalar {
        value: String,
        plain: bool,
    },
    Sequence(Vec<Node>),
    /// Entries in document order (order matters for ranges and for output).
    Mapping(Vec<(Node, Node)>),
}

impl Node {
    /// The text of a scalar node, `None` for collections.
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// True for a plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { value, plain: true }
            if value.is_empty() || value == "~" || value == "null" || value == "Null" || value == "NULL")
    }

    /// A word for error messages: "a mapping", "a list", "the text \"x\"".
    pub fn describe(&self) -> String {
        match &self.kind {
            NodeKind::Scalar { value, .. } if self.is_null() && value.is_empty() => {
                "nothing".to_string()
            }
            NodeKind::Scalar { value, .. } => format!("`{value}`"),
            NodeKind::Sequence(_) => "a list".to_string(),
            NodeKind::Mapping(_) => "a mapping".to_string(),
        }
    }
}

/// A syntax error with its position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

/// Parses one YAML document. An empty document gives an empty mapping.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|error| SyntaxError {
            mark: Mark::from_marker(error.marker()),
            message: error.info().to_string(),
        })?;
    if let Some(error) = builder.error {
        return Err(error);
    }
    Ok(builder.root.unwrap_or(Node {
        kind: NodeKind::Mapping(Vec::new()),
        mark: Mark { line: 1, column: 1 },
    }))
}

/// Collections under construction, innermost last.
enum Open {
    Sequence {
        mark: Mark,
        anchor: usize,
        items: Vec<Node>,
    },
    Mapping {
        mark: Mark,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
    },
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Open>,
    root: Option<Node>,
    anchors: Vec<(usize, Node)>,
    error: Option<SyntaxError>,
}

impl TreeBuilder {
    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.push((anchor, node.clone()));
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Open::Sequence { items, .. }) => items.push(node),
            Some(Open::Mapping {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, marker: Marker) {
        if self.error.is_some() {
            return;
        }
        let mark = Mark::from_marker(&marker);
        match event {
            Event::Scalar(value, style, anchor, _tag) => {
                let plain = matches!(style, TScalarStyle::Plain);
                self.finish(
                    Node {
                        kind: NodeKind::Scalar { value, plain },
                        mark,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Open::Sequence {
                mark,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Open::Mapping {
                mark,
                anchor,
                entries: Vec::new(),
                pending_key: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Open::Sequence {
                        mark,
                        anchor,
                        items,
                    }) => (
                        Node {
                            kind: NodeKind::Sequence(items),
                            mark,
                        },
                        anchor,
                    ),
                    Some(Open::Mapping {
                        mark,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node {
                            kind: NodeKind::Mapping(entries),
                            mark,
                        },
                        anchor,
                    ),
                    None => return,
                };
                self.finish(node, anchor);
            }
            Event::Alias(id) => match self.anchors.iter().rev().find(|(a, _)| *a == id) {
                Some((_, node)) => {
                    let mut node = node.clone();
                    node.mark = mark;
                    self.finish(node, 0);
                }
                None => {
                    self.error = Some(SyntaxError {
                        mark,
                        message: "alias to an unknown anchor".to_string(),
                    })
                }
            },
            Event::DocumentStart if self.root.is_some() => {
                self.error = Some(SyntaxError {
                    mark,
                    message: "a shard map is one YAML document; found a second `---` document"
                        .to_string(),
                })
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_one_based_lines_and_columns() {
        let node = parse("a: 1\nb:\n  c: [x, \"y\"]\n").expect("valid yaml");
        let NodeKind::Mapping(entries) = &node.kind else {
            panic!("expected mapping")
        };
        assert_eq!(entries[0].0.mark, Mark { line: 1, column: 1 });
        assert_eq!(entries[0].1.mark, Mark { line: 1, column: 4 });
        let NodeKind::Mapping(inner) = &entries[1].1.kind else {
            panic!("expected mapping")
        };
        assert_eq!(inner[0].0.mark, Mark { line: 3, column: 3 });
        let NodeKind::Sequence(items) = &inner[0].1.kind else {
            panic!("expected sequence")
        };
        assert_eq!(
            items[1].mark,
            Mark {
                line: 3,
                column: 10
            }
        );
        assert!(matches!(
            &items[1].kind,
            NodeKind::Scalar { plain: false, .. }
        ));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let error = parse("a: [1, 2\nb: 3\n").expect_err("unclosed flow sequence");
        assert!(error.mark.line >= 1, "{error:?}");
    }

    #[test]
    fn aliases_resolve_to_the_anchored_node() {
        let node = parse("a: &x {k: v}\nb: *x\n").expect("valid yaml");
        let NodeKind::Mapping(entries) = &node.kind else {
            panic!("expected mapping")
        };
        assert!(matches!(entries[1].1.kind, NodeKind::Mapping(_)));
    }

    #[test]
    fn empty_document_is_an_empty_mapping() {
        let node = parse("").expect("valid");
        assert!(matches!(node.kind, NodeKind::Mapping(ref e) if e.is_empty()));
    }
}
