//! Dataset file formats: reading Alpaca, ShareGPT, OpenAI-messages and plain-text files into
//! [`Record`]s.
//!
//! Three containers are understood:
//! * **JSON Lines** (`.jsonl`, `.ndjson`, or a `.json` file whose first non-blank character is
//!   `{`): one JSON object per line, streamed line by line, so a file of any size is never
//!   held in memory at once. Blank lines are skipped.
//! * **JSON array** (a `.json` file whose first non-blank character is `[`): the file is read
//!   into memory whole (these files are small in practice), then its elements are parsed one
//!   at a time. Errors name the element ("record 5") and the line it starts on.
//! * **Plain text** (`.txt`, `.text`, `.md`): blocks separated by blank lines, each one a
//!   [`Record::Text`]; streamed line by line.
//!
//! * **CSV / TSV** (`.csv`, `.tsv`): a header row naming the columns, then one record per row;
//!   streamed. Cells of the columns `conversations`, `messages`, `history` and `tools` hold
//!   JSON. Errors name the row's line.
//! * **Parquet** (`.parquet`): one record per row, streamed row group by row group; nested
//!   columns (lists of structs for `messages`) map to JSON arrays of objects. Errors name the
//!   row ("line" = 1-based row number).
//!
//! In the two table containers the columns must fit a schema, checked when the file is opened:
//! `instruction` + `output` (alpaca; `prompt`/`question` and `response`/`completion`/`answer`
//! are accepted for them), `conversations` (sharegpt), `messages`, or `text`.
//!
//! Files of any other extension are sniffed: JSON if they start with `[` or `{`, plain text
//! when the format is `text`, an error otherwise.
//!
//! The record schema comes from [`Format`]; with [`Format::Auto`] it is decided once, from
//! the keys of the first record, and every later record must follow the same schema.
//!
//! Role mapping (every record becomes `system` / `user` / `assistant` / `tool` messages):
//!
//! | source | becomes |
//! |---|---|
//! | ShareGPT `human`, `user` | `user` |
//! | ShareGPT `gpt`, `assistant`, `bot`, `model`, `chatgpt` | `assistant` |
//! | ShareGPT `function_call` | `assistant` (the raw call JSON is its content, so it is trained on) |
//! | ShareGPT `observation`, `tool`, `function` | `tool` (a tool result: never trained on) |
//! | messages `developer` | `system` |
//! | messages `function` | `tool` |
//!
//! Tool definitions (a ShareGPT or messages record's top-level `tools`) are not lost: they
//! are appended to the system message after [`TOOLS_PREAMBLE`], because a [`Record`] carries
//! only messages and most chat templates know nothing of tools.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool` (see the module docs for how source roles map).
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
    /// Whether this is an assistant turn (the turns that are trained on).
    pub fn is_assistant(&self) -> bool {
        self.role == "assistant"
    }
}

/// One dataset record, before templating and tokenization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A conversation; its assistant turns are the training targets.
    Chat(Vec<Message>),
    /// Plain text for continued pre-training; every token is a target.
    Text(String),
}

impl Record {
    /// Whether the record has anything to train on: an assistant turn for a conversation,
    /// non-blank text for plain text.
    pub fn has_target(&self) -> bool {
        match self {
            Record::Chat(messages) => messages.iter().any(Message::is_assistant),
            Record::Text(text) => !text.trim().is_empty(),
        }
    }
}

/// A dataset schema, as named in configs and on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ts_rs::TS)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Decide from the file extension and the first record's keys.
    #[default]
    Auto,
    /// `{instruction, input?, output, system?, history?}`.
    Alpaca,
    /// `{conversations: [{from, value}], system?, tools?}`.
    ShareGpt,
    /// OpenAI chat fine-tuning format: `{messages: [{role, content}], tools?}`.
    Messages,
    /// Plain text: a `.txt` file cut at blank lines, or JSON Lines `{"text": ...}`.
    Text,
}

impl Format {
    /// Every format, in the order the UI lists them.
    pub const ALL: [Format; 5] = [Format::Auto, Format::Alpaca, Format::ShareGpt, Format::Messages, Format::Text];

    /// The config name (`auto`, `alpaca`, `sharegpt`, `messages`, `text`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
            Format::Messages => "messages",
            Format::Text => "text",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;

    /// Parses a format name, case-insensitively; `openai` is accepted for `messages`.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(Format::Auto),
            "alpaca" => Ok(Format::Alpaca),
            "sharegpt" => Ok(Format::ShareGpt),
            "messages" | "openai" => Ok(Format::Messages),
            "text" => Ok(Format::Text),
            _ => Err(Error::config(
                "data.format",
                format!("unknown dataset format `{s}`; expected one of auto, alpaca, sharegpt, messages, text"),
            )),
        }
    }
}

/// Text put before the tool definitions appended to a conversation's system message.
pub const TOOLS_PREAMBLE: &str = "You have access to the following tools. To call one, reply with only a JSON object \
{\"name\": <tool name>, \"arguments\": <arguments object>}.\n\n";

/// Reads a dataset file as a stream of records.
///
/// Each item is the 1-based line number where the record starts (for a text file, the
/// block's first line) and the record. Errors name the file, the line and the reason; the
/// first error should be treated as fatal (the stream is not guaranteed to resync). An empty
/// file (no records at all) yields one error saying so.
///
/// Opening fails with an error for a missing file, a format that does not fit the container
/// (say `alpaca` for a `.txt` file) or a file whose type cannot be told.
pub fn read_records(path: &Path, format: Format) -> Result<RecordIter> {
    let container = detect_container(path, format)?;
    let schema = match format {
        Format::Auto if container == Container::PlainText => Some(Schema::Text),
        Format::Auto => None,
        Format::Alpaca => Some(Schema::Alpaca),
        Format::ShareGpt => Some(Schema::ShareGpt),
        Format::Messages => Some(Schema::Messages),
        Format::Text => Some(Schema::Text),
    };
    let open = || File::open(path).map_err(|e| Error::io(path, e));
    let source = match container {
        Container::JsonLines => Source::Lines(LineReader::new(open()?)),
        Container::PlainText => {
            if !matches!(format, Format::Auto | Format::Text) {
                return Err(Error::bad_input(
                    path,
                    None,
                    format!("format `{format}` needs a JSON or JSON Lines file; a plain-text file can only be read as `text`"),
                ));
            }
            Source::Blocks(LineReader::new(open()?))
        }
        Container::JsonArray => {
            let mut bytes = Vec::new();
            open()?.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
            let text = match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    let valid = e.utf8_error().valid_up_to();
                    let line = 1 + e.as_bytes()[..valid].iter().filter(|&&b| b == b'\n').count();
                    return Err(not_utf8(path, line));
                }
            };
            Source::Array(ArrayReader::new(text))
        }
        Container::Csv | Container::Parquet => {
            let source = if container == Container::Csv {
                Source::Csv(CsvSource::open(path)?)
            } else {
                Source::Parquet(ParquetSource::open(path)?)
            };
            let columns = match &source {
                Source::Csv(c) => c.columns.clone(),
                Source::Parquet(p) => p.columns.clone(),
                _ => unreachable!(),
            };
            check_columns(path, &columns, schema)?;
            source
        }
    };
    tracing::debug!(path = %path.display(), ?container, %format, "reading dataset");
    Ok(RecordIter { path: path.to_path_buf(), source, schema, produced: 0, done: false, keep_going: false, fatal: false })
}

/// The container of a dataset file, as named in the store: `jsonl`, `json`, `text`, `csv`
/// or `parquet`.
pub fn container_name(path: &Path, format: Format) -> Result<&'static str> {
    Ok(match detect_container(path, format)? {
        Container::JsonLines => "jsonl",
        Container::JsonArray => "json",
        Container::PlainText => "text",
        Container::Csv => "csv",
        Container::Parquet => "parquet",
    })
}

/// Alpaca column aliases accepted in CSV and Parquet files: (alias, canonical).
const TABLE_ALIASES: &[(&str, &str)] =
    &[("prompt", "instruction"), ("question", "instruction"), ("response", "output"), ("completion", "output"), ("answer", "output")];

/// Columns holding JSON in a CSV file.
const JSON_COLUMNS: &[&str] = &["conversations", "messages", "history", "tools"];

/// The canonical names of a table's columns (aliases applied when the canonical one is absent).
fn canonical_columns(columns: &[String]) -> Vec<String> {
    columns
        .iter()
        .map(|c| {
            let lower = c.trim().to_ascii_lowercase();
            match TABLE_ALIASES.iter().find(|(a, _)| *a == lower) {
                Some((_, canon)) if !columns.iter().any(|o| o.trim().eq_ignore_ascii_case(canon)) => canon.to_string(),
                _ => lower,
            }
        })
        .collect()
}

/// Checks that a table's columns fit the requested schema (or some schema, for `auto`).
fn check_columns(path: &Path, columns: &[String], schema: Option<Schema>) -> Result<()> {
    let canon = canonical_columns(columns);
    let has = |k: &str| canon.iter().any(|c| c == k);
    let fits = |s: Schema| match s {
        Schema::Alpaca => has("instruction") && has("output"),
        Schema::ShareGpt => has("conversations") || has("messages"),
        Schema::Messages => has("messages"),
        Schema::Text => has("text"),
    };
    let ok = match schema {
        Some(s) => fits(s),
        None => [Schema::Alpaca, Schema::ShareGpt, Schema::Messages, Schema::Text].into_iter().any(fits),
    };
    if ok {
        return Ok(());
    }
    let want = match schema {
        Some(Schema::Alpaca) => "`instruction` and `output` (or `prompt`/`question` and `response`/`completion`/`answer`)",
        Some(Schema::ShareGpt) => "`conversations`",
        Some(Schema::Messages) => "`messages`",
        Some(Schema::Text) => "`text`",
        None => "`instruction` + `output` (alpaca), `conversations` (sharegpt), `messages`, or `text`",
    };
    Err(Error::bad_input(path, Some(1), format!("the columns [{}] do not fit: expected {want}", columns.join(", "))))
}

/// Renames alias columns and parses JSON cells of a table row.
fn table_row(columns: &[String], cells: Vec<Value>) -> Value {
    let mut obj = Map::new();
    for (name, v) in columns.iter().zip(cells) {
        let v = match v {
            Value::String(s) if JSON_COLUMNS.contains(&name.as_str()) && s.trim_start().starts_with(['[', '{']) => {
                serde_json::from_str(&s).unwrap_or(Value::String(s))
            }
            Value::String(s) if s.is_empty() && name != "output" && name != "text" => Value::Null,
            other => other,
        };
        obj.insert(name.clone(), v);
    }
    Value::Object(obj)
}

/// CSV rows as JSON objects.
struct CsvSource {
    reader: csv::Reader<File>,
    columns: Vec<String>,
    record: csv::StringRecord,
}

impl CsvSource {
    fn open(path: &Path) -> Result<Self> {
        let tsv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = csv::ReaderBuilder::new().delimiter(if tsv { b'\t' } else { b',' }).flexible(false).from_reader(file);
        let headers = reader.headers().map_err(|e| csv_error(path, e))?.clone();
        let raw: Vec<String> = headers.iter().map(|h| h.trim_start_matches('\u{feff}').to_string()).collect();
        if raw.iter().all(|h| h.trim().is_empty()) {
            return Err(Error::bad_input(path, Some(1), "the CSV file has no header row"));
        }
        Ok(CsvSource { reader, columns: canonical_columns(&raw), record: csv::StringRecord::new() })
    }

    fn next(&mut self, path: &Path) -> Option<Result<(usize, Value)>> {
        match self.reader.read_record(&mut self.record) {
            Ok(false) => None,
            Ok(true) => {
                let line = self.record.position().map(|p| p.line() as usize).unwrap_or(0);
                let cells = self.record.iter().map(|c| Value::String(c.to_string())).collect();
                Some(Ok((line, table_row(&self.columns, cells))))
            }
            Err(e) => Some(Err(csv_error(path, e))),
        }
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line() as usize);
    let reason = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8 (save the file as UTF-8)".to_string(),
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => format!("this row has {len} fields; the header has {expected_len}"),
        _ => format!("invalid CSV: {e}"),
    };
    Error::bad_input(path, line, reason)
}

/// Parquet rows as JSON objects, read row group by row group.
struct ParquetSource {
    rows: parquet::record::reader::RowIter<'static>,
    columns: Vec<String>,
    row: usize,
}

impl ParquetSource {
    fn open(path: &Path) -> Result<Self> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = SerializedFileReader::new(file).map_err(|e| Error::bad_input(path, None, format!("not a readable Parquet file: {e}")))?;
        let raw: Vec<String> = reader.metadata().file_metadata().schema().get_fields().iter().map(|f| f.name().to_string()).collect();
        let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader));
        Ok(ParquetSource { rows, columns: canonical_columns(&raw), row: 0 })
    }

    fn next(&mut self, path: &Path) -> Option<Result<(usize, Value)>> {
        let row = self.rows.next()?;
        self.row += 1;
        Some(match row {
            Ok(r) => {
                // Column order as in the schema (a JSON object of the row would sort the keys).
                let cells = r.get_column_iter().map(|(_, field)| field.to_json_value()).collect();
                Ok((self.row, table_row(&self.columns, cells)))
            }
            Err(e) => Err(Error::bad_input(path, Some(self.row), format!("row {}: cannot read: {e}", self.row))),
        })
    }
}

/// A stream of records from one file; see [`read_records`].
pub struct RecordIter {
    path: PathBuf,
    source: Source,
    schema: Option<Schema>,
    produced: usize,
    done: bool,
    keep_going: bool,
    fatal: bool,
}

impl fmt::Debug for RecordIter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordIter")
            .field("path", &self.path)
            .field("schema", &self.schema)
            .field("produced", &self.produced)
            .finish_non_exhaustive()
    }
}

impl RecordIter {
    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema in use: the requested one, or the one detected from the first record
    /// (`None` before the first record of an `auto` read).
    pub fn format(&self) -> Option<Format> {
        self.schema.map(Schema::format)
    }

    /// Keep reading after a bad record where the container allows it (JSON Lines, text, CSV,
    /// Parquet rows, and schema errors in a JSON array), so that every problem of a file can
    /// be listed (dataset import). A syntax error in a JSON array still ends the stream.
    pub fn keep_going(mut self) -> Self {
        self.keep_going = true;
        self
    }

    fn next_inner(&mut self) -> Option<Result<(usize, Record)>> {
        match &mut self.source {
            Source::Csv(src) => {
                let (line, value) = match src.next(&self.path)? {
                    Ok(v) => v,
                    Err(e) => {
                        // A CSV reader cannot resync after a malformed quote.
                        self.fatal = !matches!(e, Error::BadInput { ref reason, .. } if reason.contains("fields"));
                        return Some(Err(e));
                    }
                };
                Some(to_record(&value, &mut self.schema).map(|r| (line, r)).map_err(|reason| Error::bad_input(&self.path, Some(line), reason)))
            }
            Source::Parquet(src) => {
                let (row, value) = match src.next(&self.path)? {
                    Ok(v) => v,
                    Err(e) => {
                        self.fatal = true;
                        return Some(Err(e));
                    }
                };
                Some(
                    to_record(&value, &mut self.schema)
                        .map(|r| (row, r))
                        .map_err(|reason| Error::bad_input(&self.path, Some(row), format!("row {row}: {reason}"))),
                )
            }
            Source::Lines(reader) => loop {
                let (line, text) = match reader.next_line(&self.path)? {
                    Ok(l) => l,
                    Err(e) => return Some(Err(e)),
                };
                if text.trim().is_empty() {
                    continue;
                }
                let at = |reason: String| Error::bad_input(&self.path, Some(line), reason);
                let value: Value = match serde_json::from_str(text) {
                    Ok(v) => v,
                    Err(e) => {
                        let hint = if e.is_eof() { " (JSON Lines needs one whole record per line)" } else { "" };
                        return Some(Err(at(format!(
                            "invalid JSON: {} (column {}){hint}",
                            serde_reason(&e),
                            e.column()
                        ))));
                    }
                };
                return Some(to_record(&value, &mut self.schema).map(|r| (line, r)).map_err(at));
            },
            Source::Blocks(reader) => {
                let mut block: Option<(usize, String)> = None;
                loop {
                    let next = match reader.next_line(&self.path) {
                        None => return block.map(|(line, text)| Ok((line, Record::Text(text)))),
                        Some(Err(e)) => return Some(Err(e)),
                        Some(Ok(l)) => l,
                    };
                    let (line, text) = next;
                    if text.trim().is_empty() {
                        if let Some((first, text)) = block.take() {
                            return Some(Ok((first, Record::Text(text))));
                        }
                        continue;
                    }
                    match &mut block {
                        Some((_, acc)) => {
                            acc.push('\n');
                            acc.push_str(text);
                        }
                        None => block = Some((line, text.to_string())),
                    }
                }
            }
            Source::Array(reader) => {
                let index = reader.index + 1;
                let (line, value) = match reader.next_value() {
                    Ok(None) => return None,
                    Ok(Some(v)) => v,
                    Err((line, reason)) => {
                        self.fatal = true;
                        return Some(Err(Error::bad_input(&self.path, Some(line), reason)));
                    }
                };
                Some(
                    to_record(&value, &mut self.schema).map(|r| (line, r)).map_err(|reason| {
                        Error::bad_input(&self.path, Some(line), format!("record {index}: {reason}"))
                    }),
                )
            }
        }
    }
}

impl Iterator for RecordIter {
    type Item = Result<(usize, Record)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_inner();
        match &item {
            Some(Ok(_)) => self.produced += 1,
            Some(Err(_)) if self.keep_going && !self.fatal => {}
            Some(Err(_)) => self.done = true,
            None => {
                self.done = true;
                if self.produced == 0 {
                    return Some(Err(Error::bad_input(
                        &self.path,
                        None,
                        "the dataset has no records (the file is empty)",
                    )));
                }
            }
        }
        item
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Container {
    JsonLines,
    JsonArray,
    PlainText,
    Csv,
    Parquet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schema {
    Alpaca,
    ShareGpt,
    Messages,
    Text,
}

impl Schema {
    fn format(self) -> Format {
        match self {
            Schema::Alpaca => Format::Alpaca,
            Schema::ShareGpt => Format::ShareGpt,
            Schema::Messages => Format::Messages,
            Schema::Text => Format::Text,
        }
    }
}

enum Source {
    Lines(LineReader),
    Blocks(LineReader),
    Array(ArrayReader),
    Csv(CsvSource),
    Parquet(ParquetSource),
}

fn not_utf8(path: &Path, line: usize) -> Error {
    Error::bad_input(path, Some(line), "not valid UTF-8 (save the file as UTF-8)")
}

/// The first byte that is not whitespace (after a UTF-8 byte-order mark), if any.
fn first_significant_byte(path: &Path) -> Result<Option<u8>> {
    let mut reader = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let mut at_start = true;
    loop {
        let buf = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        if buf.is_empty() {
            return Ok(None);
        }
        let mut skip = 0;
        if at_start && buf.starts_with(b"\xEF\xBB\xBF") {
            skip = 3;
        }
        at_start = false;
        if let Some(b) = buf[skip..].iter().find(|b| !b.is_ascii_whitespace()) {
            return Ok(Some(*b));
        }
        let n = buf.len();
        reader.consume(n);
    }
}

fn detect_container(path: &Path, format: Format) -> Result<Container> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    if !path.is_file() {
        let e = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        return Err(Error::io(path, if path.exists() { std::io::Error::other("not a file") } else { e }));
    }
    match ext.as_str() {
        "jsonl" | "ndjson" => return Ok(Container::JsonLines),
        "txt" | "text" | "md" => return Ok(Container::PlainText),
        "csv" | "tsv" => return Ok(Container::Csv),
        "parquet" => return Ok(Container::Parquet),
        _ => {}
    }
    match first_significant_byte(path)? {
        Some(b'[') => Ok(Container::JsonArray),
        Some(b'{') => Ok(Container::JsonLines),
        // An empty file: any line-oriented reader reports "no records".
        None => Ok(Container::JsonLines),
        Some(_) if format == Format::Text && ext != "json" => Ok(Container::PlainText),
        Some(_) => Err(Error::bad_input(
            path,
            None,
            if ext == "json" {
                "not JSON: a .json dataset must start with `[` (an array of records) or `{` (one record per line)"
                    .to_string()
            } else {
                format!(
                    "cannot tell the dataset type of a `.{ext}` file: use .json, .jsonl or .txt, or pass format `text` for plain text"
                )
            },
        )),
    }
}

/// Reads a file line by line as UTF-8, tracking 1-based line numbers.
struct LineReader {
    reader: BufReader<File>,
    line: usize,
    buf: Vec<u8>,
}

impl LineReader {
    fn new(file: File) -> Self {
        LineReader { reader: BufReader::new(file), line: 0, buf: Vec::new() }
    }

    /// The next line without its line ending, or `None` at the end of the file.
    fn next_line(&mut self, path: &Path) -> Option<Result<(usize, &str)>> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(Err(Error::io(path, e))),
        }
        self.line += 1;
        let mut bytes = &self.buf[..];
        if self.line == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        match std::str::from_utf8(bytes) {
            Ok(s) => Some(Ok((self.line, s))),
            Err(_) => Some(Err(not_utf8(path, self.line))),
        }
    }
}

/// Walks the elements of a JSON array held in memory, one element at a time, tracking the
/// line each element starts on.
struct ArrayReader {
    text: String,
    pos: usize,
    /// Line number (1-based) of byte `scanned`.
    line: usize,
    /// Byte offset where line `line` starts.
    line_start: usize,
    /// Byte offset up to which newlines have been counted.
    scanned: usize,
    /// Elements returned so far.
    index: usize,
    finished: bool,
}

type ArrayError = (usize, String);

impl ArrayReader {
    fn new(text: String) -> Self {
        let pos = if text.starts_with('\u{feff}') { 3 } else { 0 };
        ArrayReader { text, pos, line: 1, line_start: 0, scanned: 0, index: 0, finished: false }
    }

    fn line_at(&mut self, pos: usize) -> usize {
        if pos > self.scanned {
            for (i, &b) in self.text.as_bytes()[self.scanned..pos].iter().enumerate() {
                if b == b'\n' {
                    self.line += 1;
                    self.line_start = self.scanned + i + 1;
                }
            }
            self.scanned = pos;
        }
        self.line
    }

    fn skip_ws(&mut self) {
        let bytes = self.text.as_bytes();
        while self.pos < bytes.len() && bytes[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn fail(&mut self, reason: impl Into<String>) -> ArrayError {
        self.finished = true;
        let line = self.line_at(self.pos);
        (line, reason.into())
    }

    fn next_value(&mut self) -> std::result::Result<Option<(usize, Value)>, ArrayError> {
        if self.finished {
            return Ok(None);
        }
        self.skip_ws();
        if self.index == 0 {
            match self.peek() {
                Some(b'[') => self.pos += 1,
                _ => return Err(self.fail("expected a JSON array of records")),
            }
            self.skip_ws();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return self.finish();
            }
        } else {
            match self.peek() {
                Some(b']') => {
                    self.pos += 1;
                    return self.finish();
                }
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(_) => {
                    let n = self.index;
                    return Err(self.fail(format!("invalid JSON after record {n}: expected `,` or `]`")));
                }
                None => {
                    let n = self.index;
                    return Err(self.fail(format!("invalid JSON after record {n}: the array is not closed with `]`")));
                }
            }
        }
        let start = self.pos;
        let start_line = self.line_at(start);
        let line_start = self.line_start;
        let index = self.index + 1;
        let mut stream = serde_json::Deserializer::from_str(&self.text[start..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                self.pos = start + stream.byte_offset();
                self.index += 1;
                Ok(Some((start_line, v)))
            }
            Some(Err(e)) => {
                self.finished = true;
                let line = start_line + e.line().saturating_sub(1);
                let column = if e.line() <= 1 { start - line_start + e.column() } else { e.column() };
                Err((line, format!("record {index}: invalid JSON: {} (column {column})", serde_reason(&e))))
            }
            None => Err(self.fail(format!("record {index}: expected a value, found the end of the file"))),
        }
    }

    fn finish(&mut self) -> std::result::Result<Option<(usize, Value)>, ArrayError> {
        self.skip_ws();
        if self.pos < self.text.len() {
            return Err(self.fail("unexpected content after the closing `]` of the array"));
        }
        self.finished = true;
        Ok(None)
    }
}

/// serde_json's message without its "at line L column C" suffix (positions are reported
/// separately, relative to the whole file).
fn serde_reason(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required string field.
fn req_str<'a>(obj: &'a Map<String, Value>, key: &str, ctx: &str) -> std::result::Result<&'a str, String> {
    match obj.get(key) {
        None => Err(format!("{ctx}missing field `{key}`")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("{ctx}field `{key}` must be a string, found {}", kind_name(other))),
    }
}

/// An optional string field (`null` counts as absent).
fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("field `{key}` must be a string, found {}", kind_name(other))),
    }
}

fn req_array<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a [Value], String> {
    match obj.get(key) {
        None => Err(format!("missing field `{key}`")),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(format!("field `{key}` must be an array, found {}", kind_name(other))),
    }
}

fn detect_schema(obj: &Map<String, Value>) -> std::result::Result<Schema, String> {
    if obj.contains_key("conversations") {
        return Ok(Schema::ShareGpt);
    }
    if let Some(Value::Array(items)) = obj.get("messages") {
        // LLaMA-Factory's ShareGPT variant keeps {from, value} turns under `messages`.
        let sharegpt = items.first().and_then(Value::as_object).is_some_and(|m| m.contains_key("from"));
        return Ok(if sharegpt { Schema::ShareGpt } else { Schema::Messages });
    }
    if obj.contains_key("messages") {
        return Ok(Schema::Messages);
    }
    if obj.contains_key("instruction") {
        return Ok(Schema::Alpaca);
    }
    if obj.contains_key("text") {
        return Ok(Schema::Text);
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Err(format!(
        "cannot tell the dataset format from the first record's keys [{}]: expected `instruction` (alpaca), \
         `conversations` (sharegpt), `messages` or `text`; pass the format explicitly",
        keys.join(", ")
    ))
}

fn to_record(value: &Value, schema: &mut Option<Schema>) -> std::result::Result<Record, String> {
    if let (Value::String(s), None | Some(Schema::Text)) = (value, *schema) {
        *schema = Some(Schema::Text);
        return Ok(Record::Text(s.clone()));
    }
    let obj = match value {
        Value::Object(o) => o,
        other => return Err(format!("expected a JSON object, found {}", kind_name(other))),
    };
    let schema = match *schema {
        Some(s) => s,
        None => {
            let s = detect_schema(obj)?;
            tracing::debug!(format = %s.format(), "detected dataset format");
            *schema = Some(s);
            s
        }
    };
    match schema {
        Schema::Alpaca => alpaca(obj),
        Schema::ShareGpt => sharegpt(obj),
        Schema::Messages => openai_messages(obj),
        Schema::Text => Ok(Record::Text(req_str(obj, "text", "")?.to_string())),
    }
}

/// The system message with the tool definitions (if any) appended.
fn system_with_tools(system: Option<&str>, tools: Option<&Value>) -> Option<String> {
    let tools = match tools {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let t = s.trim();
            (!t.is_empty() && t != "[]" && t != "{}").then(|| t.to_string())
        }
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(other) => Some(other.to_string()),
    };
    let system = system.filter(|s| !s.is_empty());
    match (system, tools) {
        (None, None) => None,
        (Some(s), None) => Some(s.to_string()),
        (None, Some(t)) => Some(format!("{TOOLS_PREAMBLE}{t}")),
        (Some(s), Some(t)) => Some(format!("{s}\n\n{TOOLS_PREAMBLE}{t}")),
    }
}

fn alpaca(obj: &Map<String, Value>) -> std::result::Result<Record, String> {
    let instruction = req_str(obj, "instruction", "")?;
    let input = opt_str(obj, "input")?.unwrap_or("");
    let output = req_str(obj, "output", "")?;
    let mut messages = Vec::new();
    if let Some(system) = opt_str(obj, "system")?.filter(|s| !s.is_empty()) {
        messages.push(Message::system(system));
    }
    match obj.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(pairs)) => {
            for (i, pair) in pairs.iter().enumerate() {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(u), Value::String(a)]) => {
                        messages.push(Message::user(u.as_str()));
                        messages.push(Message::assistant(a.as_str()));
                    }
                    _ => return Err(format!("history[{i}] must be a [user, assistant] pair of strings")),
                }
            }
        }
        Some(other) => return Err(format!("field `history` must be an array, found {}", kind_name(other))),
    }
    let user = match (instruction.is_empty(), input.is_empty()) {
        (_, true) => instruction.to_string(),
        (true, false) => input.to_string(),
        (false, false) => format!("{instruction}\n\n{input}"),
    };
    messages.push(Message::user(user));
    messages.push(Message::assistant(output));
    Ok(Record::Chat(messages))
}

fn sharegpt(obj: &Map<String, Value>) -> std::result::Result<Record, String> {
    let key =
        if obj.contains_key("conversations") || !obj.contains_key("messages") { "conversations" } else { "messages" };
    let turns = req_array(obj, key)?;
    let mut messages = Vec::with_capacity(turns.len() + 1);
    let system = system_with_tools(opt_str(obj, "system")?, obj.get("tools"));
    if let Some(system) = system {
        messages.push(Message::system(system));
    }
    for (i, turn) in turns.iter().enumerate() {
        let ctx = format!("{key}[{i}]: ");
        let turn = turn.as_object().ok_or_else(|| format!("{ctx}expected an object, found {}", kind_name(turn)))?;
        let (from, value) = if turn.contains_key("from") || !turn.contains_key("role") {
            (req_str(turn, "from", &ctx)?, req_str(turn, "value", &ctx)?)
        } else {
            (req_str(turn, "role", &ctx)?, req_str(turn, "content", &ctx)?)
        };
        let role = match from.to_ascii_lowercase().as_str() {
            "human" | "user" => "user",
            "gpt" | "assistant" | "bot" | "model" | "chatgpt" | "function_call" => "assistant",
            "observation" | "tool" | "function" => "tool",
            "system" => "system",
            _ => {
                return Err(format!(
                    "{ctx}unknown speaker `{from}` (expected human, gpt, system, function_call or observation)"
                ))
            }
        };
        if role == "system" && messages.first().is_some_and(|m| m.role == "system") && i == 0 {
            // Both a top-level `system` and a leading system turn: keep both texts, in order.
            if let Some(first) = messages.first_mut() {
                first.content = format!("{}\n\n{}", value, first.content);
            }
            continue;
        }
        messages.push(Message::new(role, value));
    }
    Ok(Record::Chat(messages))
}

fn openai_messages(obj: &Map<String, Value>) -> std::result::Result<Record, String> {
    let items = req_array(obj, "messages")?;
    let mut messages = Vec::with_capacity(items.len() + 1);
    for (i, item) in items.iter().enumerate() {
        let ctx = format!("messages[{i}]: ");
        let m = item.as_object().ok_or_else(|| format!("{ctx}expected an object, found {}", kind_name(item)))?;
        let role = match m.get("role") {
            None if m.contains_key("from") => {
                return Err(format!(
                    "{ctx}missing field `role` (turns with `from`/`value` are ShareGPT: use format `sharegpt`)"
                ))
            }
            _ => req_str(m, "role", &ctx)?,
        };
        let role = match role.to_ascii_lowercase().as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" | "function" => "tool",
            _ => return Err(format!("{ctx}unknown role `{role}` (expected system, user, assistant or tool)")),
        };
        let content = match m.get("content") {
            None => return Err(format!("{ctx}missing field `content`")),
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(format!(
                    "{ctx}field `content` must be a string, found {} (multi-part content and tool-call-only \
                     messages are not supported)",
                    kind_name(other)
                ))
            }
        };
        messages.push(Message::new(role, content));
    }
    if let Some(tools) = obj.get("tools").filter(|t| !t.is_null()) {
        match messages.first_mut().filter(|m| m.role == "system") {
            Some(first) => {
                first.content = system_with_tools(Some(&first.content), Some(tools)).unwrap_or_default();
            }
            None => {
                if let Some(system) = system_with_tools(None, Some(tools)) {
                    messages.insert(0, Message::system(system));
                }
            }
        }
    }
    Ok(Record::Chat(messages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(content).unwrap();
        path
    }

    fn all(path: &Path, format: Format) -> Result<Vec<(usize, Record)>> {
        read_records(path, format)?.collect()
    }

    fn err(path: &Path, format: Format) -> String {
        match all(path, format) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
            assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{}\"", f.name()));
            assert_eq!(serde_json::from_str::<Format>(&format!("\"{f}\"")).unwrap(), f);
        }
        assert_eq!("ShareGPT".parse::<Format>().unwrap(), Format::ShareGpt);
    }

    #[test]
    fn unknown_format_name_is_a_config_error() {
        let e = "csvx".parse::<Format>().unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("csvx") && msg.contains("sharegpt") && msg.contains("data.format"), "{msg}");
    }

    #[test]
    fn alpaca_jsonl_with_input_system_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "a.jsonl",
            br#"{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief.", "history": [["hi", "hello"]]}

{"instruction": "Say hi", "input": "", "output": "hi"}
"#,
        );
        let recs = all(&p, Format::Auto).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0],
            (
                1,
                Record::Chat(vec![
                    Message::system("Be brief."),
                    Message::user("hi"),
                    Message::assistant("hello"),
                    Message::user("Add\n\n2 and 3"),
                    Message::assistant("5"),
                ])
            )
        );
        assert_eq!(recs[1], (3, Record::Chat(vec![Message::user("Say hi"), Message::assistant("hi")])));
    }

    #[test]
    fn alpaca_json_array_and_format_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "a.json", b"\xEF\xBB\xBF[\n {\"instruction\": \"x\", \"output\": \"y\"},\n {\"instruction\": \"z\", \"input\": null, \"output\": \"w\"}\n]\n");
        let mut it = read_records(&p, Format::Auto).unwrap();
        assert_eq!(it.format(), None);
        let first = it.next().unwrap().unwrap();
        assert_eq!(it.format(), Some(Format::Alpaca));
        assert_eq!(first, (2, Record::Chat(vec![Message::user("x"), Message::assistant("y")])));
        let second = it.next().unwrap().unwrap();
        assert_eq!(second.0, 3);
        assert!(it.next().is_none());
        assert!(it.next().is_none());
    }

    #[test]
    fn sharegpt_roles_tools_and_system() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "s.jsonl",
            br#"{"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{\"name\": \"w\"}"}, {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}], "tools": "[{\"name\": \"w\"}]", "system": "S"}
{"conversations": [{"from": "system", "value": "Sys"}, {"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}], "tools": "[]"}
"#,
        );
        let recs = all(&p, Format::Auto).unwrap();
        let Record::Chat(m) = &recs[0].1 else { panic!() };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "assistant"]);
        assert_eq!(m[0].content, format!("S\n\n{TOOLS_PREAMBLE}[{{\"name\": \"w\"}}]"));
        assert_eq!(m[2].content, "{\"name\": \"w\"}");
        assert_eq!(recs[1].1, Record::Chat(vec![Message::system("Sys"), Message::user("q"), Message::assistant("a")]));
    }

    #[test]
    fn openai_messages_and_tools() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "m.jsonl",
            br#"{"messages": [{"role": "developer", "content": "D"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": 1}]}
{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "tools": [{"type": "function"}]}
"#,
        );
        let recs = all(&p, Format::Messages).unwrap();
        assert_eq!(recs[0].1, Record::Chat(vec![Message::system("D"), Message::user("u"), Message::assistant("a")]));
        let Record::Chat(m) = &recs[1].1 else { panic!() };
        assert_eq!(m[0].role, "system");
        assert!(m[0].content.starts_with(TOOLS_PREAMBLE));
    }

    #[test]
    fn text_file_blocks_and_text_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "t.txt", b"First para\r\nline two\n\n\n\nSecond\n   \nThird");
        let recs = all(&p, Format::Auto).unwrap();
        assert_eq!(
            recs,
            vec![
                (1, Record::Text("First para\nline two".into())),
                (6, Record::Text("Second".into())),
                (8, Record::Text("Third".into())),
            ]
        );
        let p = write(&dir, "t.jsonl", b"{\"text\": \"hello\"}\n{\"text\": \"world\", \"meta\": 1}\n");
        let recs = all(&p, Format::Auto).unwrap();
        assert_eq!(recs[1], (2, Record::Text("world".into())));
        // A format that needs JSON on a text file.
        let p = write(&dir, "t2.txt", b"x");
        let e = read_records(&p, Format::Alpaca).unwrap_err().to_string();
        assert!(e.contains("t2.txt") && e.contains("alpaca"), "{e}");
    }

    #[test]
    fn malformed_json_line_names_file_line_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "bad.jsonl",
            b"{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\", \"output\": }\n",
        );
        let e = err(&p, Format::Auto);
        assert!(e.contains("bad.jsonl:3:"), "{e}");
        assert!(e.contains("invalid JSON: expected value (column 32)"), "{e}");
        // A pretty-printed single object in a .jsonl file gets a hint.
        let p = write(&dir, "pretty.jsonl", b"{\n  \"text\": \"a\"\n}\n");
        let e = err(&p, Format::Auto);
        assert!(e.contains("pretty.jsonl:1:") && e.contains("one whole record per line"), "{e}");
    }

    #[test]
    fn malformed_json_array_names_record_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "bad.json",
            b"[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": \"a\",\n   \"output\": tru}\n]",
        );
        let e = err(&p, Format::Auto);
        assert!(e.contains("bad.json:4:") && e.contains("record 2: invalid JSON"), "{e}");
        let p = write(&dir, "bad2.json", b"[{\"text\": \"a\"} {\"text\": \"b\"}]");
        let e = err(&p, Format::Auto);
        assert!(e.contains("bad2.json:1:") && e.contains("after record 1"), "{e}");
        let p = write(&dir, "bad3.json", b"[{\"text\": \"a\"}, {\"text\": \"b\"}");
        let e = err(&p, Format::Auto);
        assert!(e.contains("not closed"), "{e}");
    }

    #[test]
    fn missing_fields_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "a.jsonl", b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\"}\n");
        let e = err(&p, Format::Auto);
        assert!(e.contains("a.jsonl:2:") && e.contains("missing field `output`"), "{e}");

        let p = write(
            &dir,
            "m.jsonl",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"content\": \"b\"}]}\n",
        );
        let e = err(&p, Format::Auto);
        assert!(e.contains("m.jsonl:1:") && e.contains("messages[1]: missing field `role`"), "{e}");

        let p = write(
            &dir,
            "arr.json",
            b"[\n{\"instruction\": \"a\", \"output\": \"b\"},\n{\"instruction\": \"a\", \"output\": \"b\"},\n{\"instruction\": \"a\"}\n]",
        );
        let e = err(&p, Format::Alpaca);
        assert!(e.contains("arr.json:4:") && e.contains("record 3: missing field `output`"), "{e}");

        let p = write(&dir, "s.jsonl", b"{\"conversations\": [{\"from\": \"human\"}]}\n");
        let e = err(&p, Format::ShareGpt);
        assert!(e.contains("conversations[0]: missing field `value`"), "{e}");
    }

    #[test]
    fn non_string_content_is_rejected_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let p =
            write(&dir, "m.jsonl", br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#);
        let e = err(&p, Format::Messages);
        assert!(e.contains("m.jsonl:1:") && e.contains("`content` must be a string, found an array"), "{e}");
        let p = write(&dir, "r.jsonl", br#"{"messages": [{"role": "wizard", "content": "x"}]}"#);
        assert!(err(&p, Format::Messages).contains("unknown role `wizard`"));
        let p = write(&dir, "n.jsonl", b"[1, 2]\n");
        assert!(err(&p, Format::Alpaca).contains("expected a JSON object, found an array"));
    }

    #[test]
    fn unknown_keys_cannot_be_auto_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "u.jsonl", b"{\"question\": \"a\", \"answer\": \"b\"}\n");
        let e = err(&p, Format::Auto);
        assert!(e.contains("u.jsonl:1:") && e.contains("question") && e.contains("pass the format"), "{e}");
    }

    #[test]
    fn empty_files_are_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in
            [("e.jsonl", &b""[..]), ("e.json", b"  []  "), ("e.txt", b"\n\n  \n"), ("b.jsonl", b"\n\n")]
        {
            let p = write(&dir, name, content);
            let e = err(&p, Format::Auto);
            assert!(e.contains(name) && e.contains("no records"), "{e}");
        }
    }

    #[test]
    fn non_utf8_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "x.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n");
        let e = err(&p, Format::Auto);
        assert!(e.contains("x.jsonl:2:") && e.contains("not valid UTF-8"), "{e}");
        let p = write(&dir, "x.json", b"[\n{\"text\": \"ok\"},\n\n{\"text\": \"caf\xe9\"}]");
        let e = err(&p, Format::Auto);
        assert!(e.contains("x.json:4:") && e.contains("not valid UTF-8"), "{e}");
        let p = write(&dir, "x.txt", b"fine\n\n\xff\xfe");
        let e = err(&p, Format::Text);
        assert!(e.contains("x.txt:3:") && e.contains("not valid UTF-8"), "{e}");
    }

    #[test]
    fn missing_file_and_unknown_extension() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_records(&dir.path().join("nope.jsonl"), Format::Auto).unwrap_err().to_string();
        assert!(e.contains("nope.jsonl"), "{e}");
        let p = write(&dir, "d.dat", b"a,b\n1,2\n");
        let e = read_records(&p, Format::Auto).unwrap_err().to_string();
        assert!(e.contains("d.dat") && e.contains(".dat"), "{e}");
        // Sniffed as text when asked for text.
        assert_eq!(all(&p, Format::Text).unwrap().len(), 1);
        // A CSV file is a table: its columns must fit a schema.
        let p = write(&dir, "d.csv", b"a,b\n1,2\n");
        let e = read_records(&p, Format::Auto).unwrap_err().to_string();
        assert!(e.contains("d.csv:1") && e.contains("[a, b]"), "{e}");
        let p = write(&dir, "t.csv", b"text\nhello\n\"two\nlines\"\n");
        assert_eq!(all(&p, Format::Auto).unwrap().len(), 2);
        // A .json file that is JSON Lines.
        let p = write(&dir, "l.json", b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
        assert_eq!(all(&p, Format::Auto).unwrap().len(), 2);
    }
}
