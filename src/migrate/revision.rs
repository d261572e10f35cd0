//! One revision on disk: `migrations/<rev>_<slug>/up.sql` (+ optional `down.sql`).
//!
//! The metadata lives in a `--` comment header at the top of `up.sql`, so a
//! revision stays a plain SQL file that psql can run as is:
//!
//! ```sql
//! -- revision: 3f2a9c1b7d4e
//! -- down_revision: [a1b2c3d4e5f6, 0f0f0f0f0f0f]   (none | one id | a list = merge)
//! -- branch_labels: [billing]
//! -- depends_on: 9e8d7c6b5a4f
//! -- transactional: true
//! -- kind: schema
//! -- irreversible: false
//! -- message: add invoices
//! CREATE TABLE invoices (...);
//! ```
//!
//! The header is parsed by hand rather than as YAML because YAML would read
//! ids such as `123456789012` as numbers and `12e456789012` as a float; every
//! error names the file and line instead of panicking.

use std::fmt;
use std::path::{Path, PathBuf};

/// Header keys we understand (also used for "did you mean" on typos).
const KEYS: &[&str] = &[
    "revision",
    "down_revision",
    "branch_labels",
    "depends_on",
    "transactional",
    "kind",
    "irreversible",
    "message",
    "batch",
    "scope",
];

/// What a revision changes: the schema, or rows (data migrations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    #[default]
    Schema,
    Data,
}

/// How a revision is cut into transactions on each shard (header `batch`).
///
/// - `batch: key=id size=5000 [table=users]` (a `kind: data` revision): the
///   statements contain `{{batch}}`, replaced for each batch by a key-range
///   predicate; each batch is its own transaction with its checkpoint;
/// - `batch: size=20` with `scope: tenants`: tenant schemas per transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The ordered key column (data batches); `None` for tenant batches.
    pub key: Option<String>,
    /// The table whose key is walked; inferred from the first statement
    /// (`UPDATE t` / `DELETE FROM t`) when not given.
    pub table: Option<String>,
    /// Rows (data) or schemas (tenants) per transaction.
    pub size: usize,
}

/// Where a revision runs on each shard (header `scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Once per shard database (the default).
    #[default]
    Shard,
    /// Once per tenant schema found on the shard, with `search_path` set to it.
    Tenants,
}

/// Tenant schemas per transaction when a `scope: tenants` revision gives no `batch`.
pub const DEFAULT_TENANT_BATCH: usize = 50;

/// A parsed revision folder.
#[derive(Debug, Clone)]
pub struct Revision {
    /// 12 lowercase hex characters.
    pub id: String,
    /// The folder name after `<rev>_`.
    pub slug: String,
    /// The `message` header, or the slug with `_` as spaces.
    pub message: String,
    pub dir: PathBuf,
    pub up_path: PathBuf,
    pub down_path: Option<PathBuf>,
    /// Parents: empty for a base, several for a merge.
    pub down_revisions: Vec<String>,
    pub branch_labels: Vec<String>,
    /// As written (ids, prefixes or branch labels); the graph resolves them.
    pub depends_on: Vec<String>,
    pub transactional: bool,
    pub kind: Kind,
    pub irreversible: bool,
    /// `batch` header: run in checkpointed batches (see [`Batch`]).
    pub batch: Option<Batch>,
    pub scope: Scope,
    pub up_sql: String,
    pub down_sql: Option<String>,
    /// md5 (hex) of `up.sql` with CRLF normalised to LF; see [`checksum`].
    pub checksum: String,
}

/// A problem in a revision file, with its place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RevisionError {
    pub path: PathBuf,
    /// 1-based; 0 when the problem is not on one line (a missing file).
    pub line: usize,
    pub message: String,
}

impl fmt::Display for RevisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
        } else {
            write!(f, "{}: {}", self.path.display(), self.message)
        }
    }
}

/// Checksum of a revision's SQL: md5 (sha2 is not a dependency of this
/// crate; md5 is enough to detect an edited file, which is all it is for).
/// CRLF is normalised so a checkout with `autocrlf` does not look edited.
pub fn checksum(sql: &str) -> String {
    format!("{:x}", md5::compute(sql.replace("\r\n", "\n").as_bytes()))
}

/// True for a well-formed revision id: 12 lowercase hex characters.
pub fn is_revision_id(text: &str) -> bool {
    text.len() == 12 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads every revision folder under `dir` (folders not shaped like
/// `<12 hex>_<slug>` are errors too, so a typo is not silently skipped;
/// hidden entries and plain files are ignored). Returns all errors found.
pub fn load_dir(dir: &Path) -> Result<Vec<Revision>, Vec<RevisionError>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        vec![RevisionError {
            path: dir.to_path_buf(),
            line: 0,
            message: format!("cannot read the migrations folder: {e}"),
        }]
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut revisions = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match load(&path) {
            Ok(revision) => revisions.push(revision),
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(revisions)
    } else {
        Err(errors)
    }
}

/// Reads one revision folder.
pub fn load(dir: &Path) -> Result<Revision, RevisionError> {
    let error = |path: &Path, line: usize, message: String| RevisionError {
        path: path.to_path_buf(),
        line,
        message,
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| error(dir, 0, "folder name is not UTF-8".into()))?;
    let (prefix, slug) = match name.split_once('_') {
        Some((p, s)) if is_revision_id(p) && !s.is_empty() => (p, s),
        _ => return Err(error(
            dir,
            0,
            "a revision folder must be named <revision>_<slug> with a 12-hex-character revision"
                .into(),
        )),
    };
    let up_path = dir.join("up.sql");
    let up_sql = std::fs::read_to_string(&up_path)
        .map_err(|e| error(&up_path, 0, format!("cannot read: {e}")))?;
    let down_path = dir.join("down.sql");
    let (down_path, down_sql) = if down_path.exists() {
        let text = std::fs::read_to_string(&down_path)
            .map_err(|e| error(&down_path, 0, format!("cannot read: {e}")))?;
        (Some(down_path), Some(text))
    } else {
        (None, None)
    };
    let header = parse_header(&up_sql).map_err(|(line, message)| error(&up_path, line, message))?;
    let id = header
        .revision
        .ok_or_else(|| error(&up_path, 1, "missing `-- revision: <12 hex>` header".into()))?;
    if id != prefix {
        return Err(error(
            &up_path,
            header.revision_line,
            format!("revision {id} does not match the folder name {name}"),
        ));
    }
    let checksum = checksum(&up_sql);
    Ok(Revision {
        message: header.message.unwrap_or_else(|| slug.replace('_', " ")),
        id,
        slug: slug.to_owned(),
        dir: dir.to_path_buf(),
        up_path,
        down_path,
        down_revisions: header.down_revisions,
        branch_labels: header.branch_labels,
        depends_on: header.depends_on,
        transactional: header.transactional,
        kind: header.kind,
        irreversible: header.irreversible,
        batch: header.batch,
        scope: header.scope,
        up_sql,
        down_sql,
        checksum,
    })
}

/// The header fields of `up.sql`.
#[derive(Debug, Default)]
struct Header {
    revision: Option<String>,
    revision_line: usize,
    down_revisions: Vec<String>,
    branch_labels: Vec<String>,
    depends_on: Vec<String>,
    transactional: bool,
    kind: Kind,
    irreversible: bool,
    message: Option<String>,
    batch: Option<Batch>,
    batch_line: usize,
    scope: Scope,
    scope_line: usize,
}

/// Parses the leading `--` comment block; `Err((line, message))`.
fn parse_header(text: &str) -> Result<Header, (usize, String)> {
    let mut header = Header {
        transactional: true,
        ..Header::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let Some(comment) = line.strip_prefix("--") else {
            break; // the SQL starts: the header is over
        };
        let comment = comment.trim();
        let Some((key, value)) = comment.split_once(':') else {
            continue; // free text
        };
        let key = key.trim();
        let value = value.trim();
        if !KEYS.contains(&key) {
            // Free comments such as "-- Note: ..." are fine; a near-miss of a
            // known key is a typo that would otherwise silently drop metadata.
            if key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                if let Some(known) = KEYS
                    .iter()
                    .find(|k| crate::suggest::edit_distance(k, key) <= 2)
                {
                    return Err((
                        line_no,
                        format!("unknown header key `{key}`; did you mean `{known}`?"),
                    ));
                }
            }
            continue;
        }
        if seen.contains(&key) {
            return Err((line_no, format!("header key `{key}` given twice")));
        }
        seen.push(key);
        match key {
            "revision" => {
                let id = unquote(value);
                if !is_revision_id(&id) {
                    return Err((
                        line_no,
                        format!("revision `{id}` is not 12 lowercase hex characters"),
                    ));
                }
                header.revision = Some(id);
                header.revision_line = line_no;
            }
            "down_revision" => {
                header.down_revisions = parse_list(value).map_err(|m| (line_no, m))?;
                for id in &header.down_revisions {
                    if !is_revision_id(id) {
                        return Err((
                            line_no,
                            format!(
                                "down_revision `{id}` is not a revision id (12 lowercase hex characters)"
                            ),
                        ));
                    }
                }
            }
            "branch_labels" => {
                header.branch_labels = parse_list(value).map_err(|m| (line_no, m))?;
                for label in &header.branch_labels {
                    let ok = !label.is_empty()
                        && !is_revision_id(label)
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                        && !matches!(label.as_str(), "head" | "heads" | "base" | "current");
                    if !ok {
                        return Err((
                            line_no,
                            format!(
                                "branch label `{label}` is not allowed (letters, digits, `_`, `-`; not a revision id nor head/heads/base/current)"
                            ),
                        ));
                    }
                }
            }
            "depends_on" => header.depends_on = parse_list(value).map_err(|m| (line_no, m))?,
            "transactional" => {
                header.transactional = parse_bool(value).map_err(|m| (line_no, m))?
            }
            "irreversible" => header.irreversible = parse_bool(value).map_err(|m| (line_no, m))?,
            "kind" => {
                header.kind = match unquote(value).as_str() {
                    "schema" => Kind::Schema,
                    "data" => Kind::Data,
                    other => {
                        return Err((
                            line_no,
                            format!("kind `{other}` is not allowed; use schema or data"),
                        ))
                    }
                }
            }
            "message" => header.message = Some(unquote(value)),
            "batch" => {
                header.batch = Some(parse_batch(value).map_err(|m| (line_no, m))?);
                header.batch_line = line_no;
            }
            "scope" => {
                header.scope = match unquote(value).as_str() {
                    "shard" => Scope::Shard,
                    "tenants" => Scope::Tenants,
                    other => {
                        return Err((
                            line_no,
                            format!("scope `{other}` is not allowed; use shard or tenants"),
                        ))
                    }
                };
                header.scope_line = line_no;
            }
            _ => {}
        }
    }
    check_combinations(&header)?;
    Ok(header)
}

/// Header keys that only make sense together (or not at all together).
fn check_combinations(h: &Header) -> Result<(), (usize, String)> {
    if h.scope == Scope::Tenants && !h.transactional {
        return Err((
            h.scope_line,
            "scope: tenants needs transactional: true (tenant schemas are migrated in transactions of `batch: size=N` schemas)".into(),
        ));
    }
    if let Some(batch) = &h.batch {
        if !h.transactional {
            return Err((
                h.batch_line,
                "batch needs transactional: true (each batch is one transaction)".into(),
            ));
        }
        match (h.scope, &batch.key) {
            (Scope::Tenants, Some(_)) => {
                return Err((
                    h.batch_line,
                    "key batching inside tenant schemas is not supported; with scope: tenants use `batch: size=N` (schemas per transaction)".into(),
                ))
            }
            (Scope::Shard, None) => {
                return Err((
                    h.batch_line,
                    "batch needs key=<column> (e.g. `batch: key=id size=5000`); `batch: size=N` alone is for scope: tenants".into(),
                ))
            }
            (Scope::Shard, Some(_)) if h.kind != Kind::Data => {
                return Err((
                    h.batch_line,
                    "key batching is for data revisions; add `-- kind: data`".into(),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// `key=id size=5000 table=users` (any order, `size` defaults to 5000 for
/// keys and [`DEFAULT_TENANT_BATCH`] otherwise).
fn parse_batch(value: &str) -> Result<Batch, String> {
    let mut batch = Batch {
        key: None,
        table: None,
        size: 0,
    };
    for word in value.split_whitespace() {
        let Some((name, v)) = word.split_once('=') else {
            return Err(format!(
                "batch: `{word}` is not name=value (expected e.g. `key=id size=5000`)"
            ));
        };
        let v = unquote(v);
        let identifier = |v: &str| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'"' | b'$'))
        };
        match name {
            "key" | "table" if !identifier(&v) => {
                return Err(format!("batch: {name} `{v}` is not an identifier"))
            }
            "key" => batch.key = Some(v),
            "table" => batch.table = Some(v),
            "size" => {
                batch.size = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000_000).contains(n))
                    .ok_or_else(|| {
                        format!("batch: size `{v}` must be a whole number from 1 to 10000000")
                    })?
            }
            other => {
                return Err(format!(
                    "batch: unknown setting `{other}`; use key, size and table"
                ))
            }
        }
    }
    if batch.size == 0 {
        batch.size = if batch.key.is_some() {
            5000
        } else {
            DEFAULT_TENANT_BATCH
        };
    }
    if batch.table.is_some() && batch.key.is_none() {
        return Err("batch: table= needs key=".into());
    }
    Ok(batch)
}

/// `none`/`null`/`~`/empty → [], `x` → [x], `[a, b]` or `a, b` → [a, b].
fn parse_list(value: &str) -> Result<Vec<String>, String> {
    let value = value.trim();
    let inner = if let Some(rest) = value.strip_prefix('[') {
        rest.strip_suffix(']')
            .ok_or_else(|| format!("`{value}`: a list must end with `]`"))?
    } else if let Some(rest) = value.strip_prefix('(') {
        rest.strip_suffix(')')
            .ok_or_else(|| format!("`{value}`: a list must end with `)`"))?
    } else {
        value
    };
    let mut items = Vec::new();
    for item in inner.split(',') {
        let item = unquote(item);
        if item.is_empty() || matches!(item.to_ascii_lowercase().as_str(), "none" | "null" | "~") {
            continue;
        }
        if items.contains(&item) {
            return Err(format!("`{item}` is listed twice"));
        }
        items.push(item);
    }
    Ok(items)
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match unquote(value).to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" => Ok(true),
        "false" | "no" | "off" => Ok(false),
        other => Err(format!("`{other}` is not a boolean; use true or false")),
    }
}

fn unquote(value: &str) -> String {
    let v = value.trim();
    let stripped = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')));
    stripped.unwrap_or(v).trim().to_owned()
}

/// The text of a new revision's `up.sql` header.
pub fn render_header(
    id: &str,
    message: &str,
    down_revisions: &[String],
    branch_labels: &[String],
    depends_on: &[String],
) -> String {
    let list = |items: &[String]| match items.len() {
        0 => "none".to_owned(),
        1 => items[0].clone(),
        _ => format!("[{}]", items.join(", ")),
    };
    let labels = if branch_labels.is_empty() {
        "none".to_owned()
    } else {
        format!("[{}]", branch_labels.join(", "))
    };
    format!(
        "-- revision: {id}\n-- down_revision: {}\n-- branch_labels: {labels}\n-- depends_on: {}\n-- transactional: true\n-- kind: schema\n-- irreversible: false\n-- message: {message}\n",
        list(down_revisions),
        list(depends_on),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, up: &str, down: Option<&str>) -> PathBuf {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("up.sql"), up).unwrap();
        if let Some(down) = down {
            std::fs::write(folder.join("down.sql"), down).unwrap();
        }
        folder
    }

    #[test]
    fn parses_a_full_header() {
        let tmp = tempfile::tempdir().unwrap();
        let folder = write(
            tmp.path(),
            "aaaaaaaaaaaa_merge_things",
            "-- revision: aaaaaaaaaaaa\n-- down_revision: [bbbbbbbbbbbb, 'cccccccccccc']\n-- branch_labels: [billing]\n-- depends_on: dddddddddddd\n-- transactional: false\n-- kind: data\n-- irreversible: yes\n-- Note: free text is fine\nSELECT 1;\n",
            Some("SELECT 2;"),
        );
        let r = load(&folder).unwrap();
        assert_eq!(r.id, "aaaaaaaaaaaa");
        assert_eq!(r.down_revisions, vec!["bbbbbbbbbbbb", "cccccccccccc"]);
        assert_eq!(r.branch_labels, vec!["billing"]);
        assert_eq!(r.depends_on, vec!["dddddddddddd"]);
        assert!(!r.transactional);
        assert_eq!(r.kind, Kind::Data);
        assert!(r.irreversible);
        assert_eq!(r.message, "merge things");
        assert_eq!(r.down_sql.as_deref(), Some("SELECT 2;"));
        assert_eq!(r.checksum, checksum(&r.up_sql));
    }

    #[test]
    fn defaults_and_none() {
        let tmp = tempfile::tempdir().unwrap();
        let folder = write(
            tmp.path(),
            "123456789012_numeric_looking",
            "-- revision: 123456789012\n-- down_revision: None\n\nCREATE TABLE t();\n-- kind: nonsense after the SQL is not header\n",
            None,
        );
        let r = load(&folder).unwrap();
        assert!(r.down_revisions.is_empty());
        assert!(r.transactional);
        assert_eq!(r.kind, Kind::Schema);
        assert!(r.down_path.is_none());
    }

    #[test]
    fn errors_name_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let cases = [
            (
                "-- revision: aaaaaaaaaaaa\n-- down_revison: x\n",
                2,
                "did you mean `down_revision`",
            ),
            ("-- revision: AAAA\n", 1, "not 12 lowercase hex"),
            ("-- revision: aaaaaaaaaaaa\n-- kind: ddl\n", 2, "kind `ddl`"),
            (
                "-- revision: aaaaaaaaaaaa\n-- transactional: maybe\n",
                2,
                "not a boolean",
            ),
            (
                "-- revision: aaaaaaaaaaaa\n-- down_revision: [bbbbbbbbbbbb\n",
                2,
                "must end with",
            ),
            (
                "-- revision: aaaaaaaaaaaa\n-- down_revision: zzz\n",
                2,
                "not a revision id",
            ),
            (
                "-- revision: aaaaaaaaaaaa\n-- revision: aaaaaaaaaaaa\n",
                2,
                "given twice",
            ),
            (
                "-- revision: bbbbbbbbbbbb\n",
                1,
                "does not match the folder",
            ),
            ("SELECT 1;\n", 1, "missing `-- revision"),
            (
                "-- revision: aaaaaaaaaaaa\n-- branch_labels: [head]\n",
                2,
                "not allowed",
            ),
            (
                "-- revision: aaaaaaaaaaaa\n-- batch: key=id size=5000\n",
                2,
                "add `-- kind: data`",
            ),
            (
                "-- revision: aaaaaaaaaaaa\n-- kind: data\n-- batch: key=id size=0\n",
                3,
                "from 1 to",
            ),
            (
                "-- revision: aaaaaaaaaaaa\n-- kind: data\n-- batch: key=id rows=5\n",
                3,
                "unknown setting `rows`",
            ),
            (
                "-- revision: aaaaaaaaaaaa\n-- scope: tenants\n-- transactional: false\n",
                2,
                "needs transactional: true",
            ),
            (
                "-- revision: aaaaaaaaaaaa\n-- scope: everywhere\n",
                2,
                "scope `everywhere`",
            ),
        ];
        for (i, (text, line, needle)) in cases.iter().enumerate() {
            let folder = write(
                &tmp.path().join(i.to_string()),
                "aaaaaaaaaaaa_x",
                text,
                None,
            );
            let e = load(&folder).unwrap_err();
            assert_eq!(e.line, *line, "{text}: {e}");
            assert!(e.to_string().contains(needle), "{text}: {e}");
            assert!(e.to_string().contains("up.sql"), "{e}");
        }
    }

    #[test]
    fn bad_folder_names_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let folder = write(tmp.path(), "add_users", "-- revision: aaaaaaaaaaaa\n", None);
        let e = load(&folder).unwrap_err();
        assert!(e.to_string().contains("<revision>_<slug>"), "{e}");
        let errors = load_dir(tmp.path()).unwrap_err();
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn batch_headers() {
        let h =
            parse_header("-- revision: aaaaaaaaaaaa\n-- kind: data\n-- batch: key=id size=5000\n")
                .unwrap();
        assert_eq!(
            h.batch,
            Some(Batch {
                key: Some("id".into()),
                table: None,
                size: 5000
            })
        );
        let h = parse_header("-- revision: aaaaaaaaaaaa\n-- scope: tenants\n-- batch: size=2\n")
            .unwrap();
        assert_eq!(h.scope, Scope::Tenants);
        assert_eq!(h.batch.map(|b| b.size), Some(2));
        let h = parse_header("-- revision: aaaaaaaaaaaa\n-- scope: tenants\n").unwrap();
        assert!(h.batch.is_none());
    }

    #[test]
    fn checksum_ignores_crlf() {
        assert_eq!(checksum("a\r\nb"), checksum("a\nb"));
        assert_ne!(checksum("a\nb"), checksum("a\nc"));
    }

    #[test]
    fn rendered_header_parses_back() {
        let text = render_header(
            "abcdefabcdef",
            "add users",
            &["111111111111".into(), "222222222222".into()],
            &["core".into()],
            &[],
        );
        let h = parse_header(&text).unwrap();
        assert_eq!(h.revision.as_deref(), Some("abcdefabcdef"));
        assert_eq!(h.down_revisions.len(), 2);
        assert_eq!(h.branch_labels, vec!["core"]);
        assert_eq!(h.message.as_deref(), Some("add users"));
    }
}
