//! The JSON-lines files of the `--request-log` flags of `simulate` and `loadtest`: a line per
//! request, which a benchmark lines up across the client and the backends by time.

use std::{
    fs::File,
    io::{self, Write},
    path::Path,
};

use serde::Serialize;

/// Creates (or truncates) `path` for `tool`'s `--request-log`, naming the tool, the flag and the
/// path when it cannot: the flag fails at start-up, not at the first request.
pub(crate) fn create(path: &Path, tool: &str) -> io::Result<File> {
    File::create(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{tool}: --request-log {}: {e}", path.display()),
        )
    })
}

/// Writes `record` as one line.
pub(crate) fn write_line(out: &mut impl Write, record: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.write_all(b"\n")
}
