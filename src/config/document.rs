//! Reading the TOML document field by field, with line numbers.
//!
//! serde stops at the first error, but `tollgate check` must report every problem of a file at
//! once, each with its line and field path. So the config is read from a spanned document
//! (`toml_edit`) through [`Fields`], which records each problem and carries on.

use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

/// One problem in a config file: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The config file as the operator named it.
    pub file: String,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// Field path such as `backends[1].quality` (empty for a file-level problem).
    pub field: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(f, "{}:{}: {}: {}", self.file, self.line, self.field, self.message)
        }
    }
}

/// Collects problems for one file and turns byte offsets into line numbers.
pub struct Problems<'s> {
    file: String,
    line_starts: Vec<usize>,
    source: &'s str,
    list: Vec<Problem>,
}

impl<'s> Problems<'s> {
    pub fn new(file: &str, source: &'s str) -> Self {
        let line_starts = std::iter::once(0).chain(source.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Self { file: file.to_owned(), line_starts, source, list: Vec::new() }
    }

    /// 1-based line holding byte `offset`.
    pub fn line_of(&self, offset: usize) -> usize {
        match self.line_starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }

    /// Records a problem at a span (or line 1 when the document kept no span).
    pub fn at(&mut self, span: Option<Range<usize>>, field: &str, message: impl Into<String>) {
        let line = span.map_or(1, |s| self.line_of(s.start.min(self.source.len())));
        self.at_line(line, field, message);
    }

    pub fn at_line(&mut self, line: usize, field: &str, message: impl Into<String>) {
        self.list.push(Problem { file: self.file.clone(), line, field: field.to_owned(), message: message.into() });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn into_vec(mut self) -> Vec<Problem> {
        self.list.sort_by_key(|p| p.line);
        self.list
    }
}

/// The keys of one table, read one at a time; what was never asked for is an unknown key.
pub struct Fields<'d> {
    path: String,
    table: &'d dyn TableLike,
    line: usize,
    known: Vec<&'static str>,
}

impl<'d> Fields<'d> {
    pub fn new(path: impl Into<String>, table: &'d dyn TableLike, line: usize) -> Self {
        Self { path: path.into(), table, line, known: Vec::new() }
    }

    /// The line of the table itself (its header, or the key that holds it).
    pub fn line(&self) -> usize {
        self.line
    }

    /// This table's own field path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether `key` is present, whatever its type.
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Field path of `key` in this table, for messages.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Line of `key`'s value, or of the table when the key is absent.
    pub fn line_of(&self, problems: &Problems<'_>, key: &str) -> usize {
        self.table
            .get_key_value(key)
            .and_then(|(k, item)| item.span().or_else(|| k.span()))
            .map_or(self.line, |s| problems.line_of(s.start))
    }

    /// A required field: missing or mistyped is a problem.
    pub fn required<T: FromToml>(&mut self, problems: &mut Problems<'_>, key: &'static str) -> Option<T> {
        let present = self.table.contains_key(key);
        let value = self.optional(problems, key);
        if !present {
            let path = self.path_of(key);
            problems.at_line(self.line, &path, format!("missing required field `{key}`"));
        }
        value
    }

    /// An optional field: absent is `None`, mistyped is a problem and `None`.
    pub fn optional<T: FromToml>(&mut self, problems: &mut Problems<'_>, key: &'static str) -> Option<T> {
        self.known.push(key);
        let (k, item) = self.table.get_key_value(key)?;
        let path = self.path_of(key);
        match T::from_item(item) {
            Ok(v) => Some(v),
            Err(expected) => {
                let span = item.span().or_else(|| k.span());
                problems.at(span, &path, format!("expected {expected}, found {}", describe(item)));
                None
            }
        }
    }

    /// A sub-table (`[x]` or an inline `{ ... }`), read with its own `Fields`.
    pub fn table(&mut self, problems: &mut Problems<'_>, key: &'static str) -> Option<Fields<'d>> {
        self.known.push(key);
        let (k, item) = self.table.get_key_value(key)?;
        let path = self.path_of(key);
        let span = item.span().or_else(|| k.span());
        let line = span.clone().map_or(self.line, |s| problems.line_of(s.start));
        match item.as_table_like() {
            Some(t) => Some(Fields::new(path, t, line)),
            None => {
                problems.at(span, &path, format!("expected a table, found {}", describe(item)));
                None
            }
        }
    }

    /// An array of tables (`[[x]]`), each read with its own `Fields`.
    pub fn array_of_tables(&mut self, problems: &mut Problems<'_>, key: &'static str) -> Vec<Fields<'d>> {
        self.known.push(key);
        let Some((k, item)) = self.table.get_key_value(key) else {
            return Vec::new();
        };
        let path = self.path_of(key);
        match item {
            Item::ArrayOfTables(tables) => tables
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let line = t.span().map_or(self.line, |s| problems.line_of(s.start));
                    Fields::new(format!("{path}[{i}]"), t as &dyn TableLike, line)
                })
                .collect(),
            Item::Value(Value::Array(values)) => {
                let mut out = Vec::new();
                for (i, v) in values.iter().enumerate() {
                    match v.as_inline_table() {
                        Some(t) => {
                            let line = v.span().map_or(self.line, |s| problems.line_of(s.start));
                            out.push(Fields::new(format!("{path}[{i}]"), t as &dyn TableLike, line));
                        }
                        None => problems.at(v.span(), &format!("{path}[{i}]"), "expected a table"),
                    }
                }
                out
            }
            other => {
                let span = other.span().or_else(|| k.span());
                problems.at(span, &path, format!("expected an array of tables, found {}", describe(other)));
                Vec::new()
            }
        }
    }

    /// Reports every key nobody asked for: a typo must not silently change routing.
    pub fn finish(&self, problems: &mut Problems<'_>) {
        for (key, item) in self.table.iter() {
            if self.known.contains(&key) {
                continue;
            }
            let span = self.table.get_key_value(key).and_then(|(k, _)| k.span()).or_else(|| item.span());
            let mut message = format!("unknown key `{key}`");
            if let Some(near) = closest(key, &self.known) {
                message.push_str(&format!(" (did you mean `{near}`?)"));
            }
            problems.at(span, &self.path_of(key), message);
        }
    }
}

/// A value type that can be read from a TOML item; `Err` names what was expected.
pub trait FromToml: Sized {
    fn from_item(item: &Item) -> Result<Self, &'static str>;
}

impl FromToml for String {
    fn from_item(item: &Item) -> Result<Self, &'static str> {
        item.as_str().map(str::to_owned).ok_or("a string")
    }
}

impl FromToml for f64 {
    fn from_item(item: &Item) -> Result<Self, &'static str> {
        // Operators write `budget_usd = 5` as often as `5.0`; both are the same amount.
        match item.as_value() {
            Some(Value::Float(f)) if f.value().is_finite() => Ok(*f.value()),
            #[expect(clippy::cast_precision_loss, reason = "config numbers are far below 2^53")]
            Some(Value::Integer(i)) => Ok(*i.value() as f64),
            _ => Err("a finite number"),
        }
    }
}

impl FromToml for u64 {
    fn from_item(item: &Item) -> Result<Self, &'static str> {
        item.as_integer().and_then(|i| u64::try_from(i).ok()).ok_or("a non-negative integer")
    }
}

impl FromToml for u32 {
    fn from_item(item: &Item) -> Result<Self, &'static str> {
        item.as_integer().and_then(|i| u32::try_from(i).ok()).ok_or("a non-negative integer below 2^32")
    }
}

impl FromToml for bool {
    fn from_item(item: &Item) -> Result<Self, &'static str> {
        item.as_bool().ok_or("true or false")
    }
}

impl FromToml for Vec<String> {
    fn from_item(item: &Item) -> Result<Self, &'static str> {
        let array = item.as_array().ok_or("an array of strings")?;
        array.iter().map(|v| v.as_str().map(str::to_owned).ok_or("an array of strings")).collect()
    }
}

fn describe(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) | Item::Value(Value::InlineTable(_)) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => match v {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a datetime",
            Value::Array(_) => "an array",
            Value::InlineTable(_) => "a table",
        },
    }
}

/// The known key closest to a typo, when it is close enough to be a likely intent.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev + cost);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_key_a_typo_meant() {
        assert_eq!(closest("qualty", &["quality", "model"]), Some("quality"));
        assert_eq!(closest("zzz", &["quality", "model"]), None);
    }

    #[test]
    fn offsets_map_to_one_based_lines() {
        let p = Problems::new("f.toml", "a = 1\nb = 2\n");
        assert_eq!(p.line_of(0), 1);
        assert_eq!(p.line_of(6), 2);
        assert_eq!(p.line_of(8), 2);
    }
}
