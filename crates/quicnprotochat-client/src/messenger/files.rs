//! Reading a file to send: everything that can refuse it (not a regular
//! file, over the limit, unreadable) happens here, before anything is
//! encrypted or sent.

use std::io::Read as _;
use std::path::Path;

use quicnprotochat_core::file::{FALLBACK_NAME, MAX_FILE_BYTES};

use super::error::MessengerError;

/// A file read to be sent.
pub(super) struct Outbound {
    /// its base name
    pub(super) name: String,
    /// its content (at most [`MAX_FILE_BYTES`])
    pub(super) content: Vec<u8>,
}

/// Reads the file at `path` (on the calling thread: call it on the
/// blocking pool).  Only a regular file is opened, so a FIFO or a device
/// never blocks or streams; a file over [`MAX_FILE_BYTES`] is refused from
/// its size, and one that grows past the limit while it is read is refused
/// too (never more than one byte past the limit is read).
pub(super) fn read(path: &Path) -> Result<Outbound, MessengerError> {
    let shown = path.display().to_string();
    let io = |source| MessengerError::ReadFile {
        path: shown.clone(),
        source,
    };
    let too_large = |size| MessengerError::FileTooLarge {
        path: shown.clone(),
        size,
    };
    let limit = u64::try_from(MAX_FILE_BYTES).unwrap_or(u64::MAX);
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(MessengerError::NotAFile(shown));
    }
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    // What was opened may not be what was looked at.
    let opened = file.metadata().map_err(io)?;
    if !opened.is_file() {
        return Err(MessengerError::NotAFile(shown));
    }
    let mut content = Vec::with_capacity(usize::try_from(opened.len().min(limit)).unwrap_or(0));
    file.take(limit + 1).read_to_end(&mut content).map_err(io)?;
    if content.len() > MAX_FILE_BYTES {
        return Err(too_large(opened.len().max(limit + 1)));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| FALLBACK_NAME.to_string());
    Ok(Outbound { name, content })
}
