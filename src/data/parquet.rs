//! Parquet datasets (as the Hugging Face Hub ships them), read row by row with the `parquet`
//! crate. Each row becomes a JSON object and goes through the same record checks as JSONL, so a
//! column of the wrong type (e.g. `messages` stored as a string) is reported with its row.

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use super::records::{ReadOutcome, parse_record};
use crate::error::{Error, Result};

/// Reads all rows of a Parquet file. Row numbers in errors are 1-based.
///
/// The `parquet` crate panics on some corrupt files (negative column offsets in the footer,
/// found by `tests/fuzz_readers.rs`); such a panic becomes an error naming the file.
pub fn read_parquet(path: &Path, bytes: Vec<u8>) -> Result<ReadOutcome> {
    let read = std::panic::AssertUnwindSafe(|| read_rows(path, bytes));
    std::panic::catch_unwind(read).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Err(Error::Data {
            path: path.to_path_buf(),
            line: 0,
            msg: format!("not a readable Parquet file (corrupt: {msg})"),
        })
    })
}

fn read_rows(path: &Path, bytes: Vec<u8>) -> Result<ReadOutcome> {
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        msg: format!("not a readable Parquet file: {e}"),
    })?;
    let rows = reader.get_row_iter(None).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        msg: format!("cannot read Parquet rows: {e}"),
    })?;
    let total = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
    let mut out = ReadOutcome::default();
    // A row that cannot be decoded (unsupported compression, corrupt page) stops the read: the
    // iterator cannot move past it, and skipping the rest of the file would drop data silently.
    for (i, row) in rows.take(total).enumerate() {
        let n = i + 1;
        let row = row.map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: n,
            msg: format!(
                "Parquet row {n}: cannot decode: {e} (VoltTrain reads uncompressed and \
                 Snappy-compressed Parquet)"
            ),
        })?;
        let v = group_to_json(&row);
        match parse_record(&v) {
            Ok(value) => out.records.push(super::records::Located { line: n, value }),
            Err(m) => out.errors.push(Error::Data {
                path: path.to_path_buf(),
                line: n,
                msg: format!("Parquet row {n}: {m}"),
            }),
        }
    }
    Ok(out)
}

fn group_to_json(row: &parquet::record::Row) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in row.get_column_iter() {
        m.insert(k.clone(), field_to_json(v));
    }
    serde_json::Value::Object(m)
}

fn field_to_json(f: &Field) -> serde_json::Value {
    use serde_json::Value as J;
    match f {
        Field::Null => J::Null,
        Field::Bool(b) => J::Bool(*b),
        Field::Byte(x) => J::from(*x),
        Field::Short(x) => J::from(*x),
        Field::Int(x) => J::from(*x),
        Field::Long(x) => J::from(*x),
        Field::UByte(x) => J::from(*x),
        Field::UShort(x) => J::from(*x),
        Field::UInt(x) => J::from(*x),
        Field::ULong(x) => J::from(*x),
        Field::Float16(x) => J::from(f32::from(*x)),
        Field::Float(x) => J::from(*x),
        Field::Double(x) => J::from(*x),
        Field::Str(s) => J::String(s.clone()),
        Field::Group(r) => group_to_json(r),
        Field::ListInternal(l) => J::Array(l.elements().iter().map(field_to_json).collect()),
        Field::MapInternal(m) => {
            let mut o = serde_json::Map::new();
            for (k, v) in m.entries() {
                let key = match k {
                    Field::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                o.insert(key, field_to_json(v));
            }
            J::Object(o)
        }
        // Binary without the UTF8 annotation: text if it decodes, else a list of byte values
        // (which the record check rejects as "found a list").
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => J::String(s.to_string()),
            Err(_) => J::Array(b.data().iter().map(|&x| J::from(x)).collect()),
        },
        // Decimals, dates, times: no record field uses them; numbers keep the check's message
        // ("must be a string, found a number").
        Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => J::from(0),
    }
}
