//! Files sent inside application messages: the limit, what a receiver
//! checks, how the name a peer sends is made safe, and how a received file
//! is saved in the download directory.
//!
//! A file travels whole in one MLS application message (content type
//! `file`, see [`crate::message::Content::File`]), end-to-end encrypted like
//! a text; the server sees only the size of the ciphertext.  Everything in
//! it comes from a peer and is checked here before a byte is written:
//!
//! - the content is at most [`MAX_FILE_BYTES`], its length is the declared
//!   size, and its SHA-256 is the declared hash ([`check`]); a file that
//!   fails is refused and never written;
//! - the name is reduced to a safe base name ([`sanitize_name`]): no
//!   directory part, no leading dot, no control, bidirectional or invisible
//!   formatting characters, at most [`MAX_NAME_BYTES`];
//! - the media type is kept only when it is a plain `type/subtype`
//!   ([`sanitize_media_type`]).
//!
//! [`save`] writes into the download directory (created mode 0700) a new
//! file (mode 0600) under a temporary name, then links it to its final
//! name, which is never an existing file or symbolic link: a taken name
//! gets ` (1)`, ` (2)`, … before its extension.  A crash leaves at most a
//! hidden temporary file, never a partial file under the final name.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Largest file content in one message: 512 KiB.  Encoded (base64 in the
/// JSON application message, then MLS) it stays under 700 KiB: well inside
/// the protocol's 5 MiB payload limit, under the 1 MiB a fetch returns at
/// once, so a file never crowds other messages out of a batch.
pub const MAX_FILE_BYTES: usize = 512 * 1024;

/// Longest name a received file is saved under, in bytes (UTF-8), before a
/// ` (N)` that makes it unique: file systems allow 255.
pub const MAX_NAME_BYTES: usize = 200;

/// Longest extension kept when a long name is shortened, in bytes.
const MAX_EXTENSION_BYTES: usize = 16;

/// Longest media type kept, in bytes.
pub const MAX_MEDIA_TYPE_BYTES: usize = 127;

/// The media type of content of unknown type.
pub const DEFAULT_MEDIA_TYPE: &str = "application/octet-stream";

/// The name a file whose name is empty once made safe is saved under.
pub const FALLBACK_NAME: &str = "file";

/// The download directory inside a profile directory, where received files
/// go unless the application chose another.
pub const DOWNLOADS_DIR: &str = "downloads";

/// Most numbered names tried before saving gives up (`name (999).ext`).
const MAX_NUMBERED: u32 = 999;

/// A file sent or received, as the history keeps it (the content is in the
/// file, not here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// the name as sent, made safe to show ([`sanitize_name`])
    pub name: String,
    /// media type (`type/subtype`, lower case)
    pub media_type: String,
    /// size in bytes, of the content sent or received
    pub size: u64,
    /// SHA-256 of the content sent or received, 64 lowercase hex
    /// characters
    pub sha256: String,
    /// what became of it
    pub status: FileStatus,
}

/// What became of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileStatus {
    /// we sent it
    Sent,
    /// received, checked and saved here
    Saved {
        /// where
        path: PathBuf,
    },
    /// received and refused: it failed a check, nothing was written
    Refused {
        /// which check
        reason: String,
    },
    /// received and checked, but writing it failed (nothing is left under
    /// its name)
    NotSaved {
        /// the error
        reason: String,
    },
}

impl FileInfo {
    /// One line for people: `[file] NAME (SIZE, TYPE)`, followed by where
    /// it was saved or why it was not.  Made of safe parts only (the name is
    /// sanitised, the media type checked), so it can go to a terminal.
    pub fn summary(&self) -> String {
        let head = format!(
            "[file] {} ({}, {})",
            self.name,
            human_size(self.size),
            self.media_type
        );
        match &self.status {
            FileStatus::Sent => head,
            FileStatus::Saved { path } => format!("{head} saved to {}", path.display()),
            FileStatus::Refused { reason } => format!("[file] {} refused: {reason}", self.name),
            FileStatus::NotSaved { reason } => format!("{head} could not be saved: {reason}"),
        }
    }
}

/// Why a received file is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// the content is over [`MAX_FILE_BYTES`]
    #[error("it is larger than the limit of 512 KiB ({MAX_FILE_BYTES} bytes)")]
    TooLarge,
    /// the declared size is not the content's length
    #[error("its declared size is not the size of its content")]
    SizeMismatch,
    /// the declared SHA-256 is not the content's (or is no SHA-256)
    #[error("its content does not match its SHA-256")]
    HashMismatch,
}

/// Checks a received file's content against what the sender declared.
pub fn check(size: u64, sha256: &str, content: &[u8]) -> Result<(), Refusal> {
    if content.len() > MAX_FILE_BYTES {
        return Err(Refusal::TooLarge);
    }
    if u64::try_from(content.len()).ok() != Some(size) {
        return Err(Refusal::SizeMismatch);
    }
    // Compared as text: the declared hash must be lowercase hex, as sent.
    if sha256 != sha256_hex(content) {
        return Err(Refusal::HashMismatch);
    }
    Ok(())
}

/// SHA-256 of `content`, 64 lowercase hex characters.
pub fn sha256_hex(content: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, content))
}

/// Whether `c` must not appear in a file name: control characters (C0,
/// DEL, C1, which include the escape that starts terminal sequences),
/// bidirectional formatting characters (which make a name read other than
/// it is, e.g. `txt.exe` shown as `exe.txt`), invisible ones, and line and
/// paragraph separators.
pub fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// A safe base name from the name a peer sent:
///
/// 1. only the last non-empty component is kept, whether `/` or `\`
///    separates them (`../../etc/passwd` is `passwd`);
/// 2. each unsafe character ([`unsafe_char`]: NUL, control characters,
///    bidirectional overrides, invisible characters) becomes `_`;
/// 3. leading dots, dashes and white space go (no hidden files, nothing
///    that reads as a command-line option, no `.` or `..`), and so does
///    trailing white space;
/// 4. a name over [`MAX_NAME_BYTES`] is shortened, keeping its extension
///    (when that is at most 16 bytes);
/// 5. an empty result is [`FALLBACK_NAME`].
pub fn sanitize_name(raw: &str) -> String {
    let last = raw
        .split(['/', '\\'])
        .rev()
        .find(|part| !part.is_empty())
        .unwrap_or_default();
    let cleaned: String = last
        .chars()
        .map(|c| if unsafe_char(c) { '_' } else { c })
        .collect();
    let trimmed = cleaned
        .trim_start_matches(|c: char| c == '.' || c == '-' || c.is_whitespace())
        .trim_end();
    let name = shorten(trimmed, MAX_NAME_BYTES);
    if name.is_empty() {
        FALLBACK_NAME.to_string()
    } else {
        name
    }
}

/// `name` cut to at most `max` bytes at a character boundary, keeping a
/// short extension.
fn shorten(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let (stem, ext) = split_extension(name);
    let ext = ext.filter(|e| e.len() <= MAX_EXTENSION_BYTES);
    let room = max - ext.map_or(0, |e| e.len() + 1);
    let source = if ext.is_some() { stem } else { name };
    let mut cut = String::new();
    for c in source.chars() {
        if cut.len() + c.len_utf8() > room {
            break;
        }
        cut.push(c);
    }
    let cut = cut.trim_end();
    match ext {
        Some(e) => format!("{cut}.{e}"),
        None => cut.to_string(),
    }
}

/// `("report", Some("pdf"))` for `report.pdf`; no extension when the only
/// dot starts the name or ends it.
fn split_extension(name: &str) -> (&str, Option<&str>) {
    match name.rfind('.') {
        Some(i) if i > 0 && i + 1 < name.len() => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    }
}

/// `name (n).ext`: the `n`th alternative to a taken name (`n` = 0 is the
/// name itself).
fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_string();
    }
    match split_extension(name) {
        (stem, Some(ext)) => format!("{stem} ({n}).{ext}"),
        (stem, None) => format!("{stem} ({n})"),
    }
}

/// A media type a peer sent, when it is a plain `type/subtype` of token
/// characters (RFC 6838), at most [`MAX_MEDIA_TYPE_BYTES`], in lower case;
/// [`DEFAULT_MEDIA_TYPE`] otherwise.  Parameters are not kept.
pub fn sanitize_media_type(raw: &str) -> String {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    match raw.split_once('/') {
        Some((t, sub)) if raw.len() <= MAX_MEDIA_TYPE_BYTES && token(t) && token(sub) => {
            raw.to_ascii_lowercase()
        }
        _ => DEFAULT_MEDIA_TYPE.to_string(),
    }
}

/// The media type of a file, from the extension of its name (a short list
/// of common types; [`DEFAULT_MEDIA_TYPE`] for the rest).
pub fn media_type_for(name: &str) -> &'static str {
    let Some(ext) = split_extension(name).1 else {
        return DEFAULT_MEDIA_TYPE;
    };
    match ext.to_ascii_lowercase().as_str() {
        "txt" | "text" | "log" => "text/plain",
        "md" | "markdown" => "text/markdown",
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "csv" => "text/csv",
        "json" => "application/json",
        "xml" => "application/xml",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        _ => DEFAULT_MEDIA_TYPE,
    }
}

/// A size for people: `512 B`, `12.3 KiB`, `1.5 MiB`.
pub fn human_size(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    let tenths = |unit: u64| {
        let t = (u128::from(bytes) * 10 + u128::from(unit) / 2) / u128::from(unit);
        format!("{}.{}", t / 10, t % 10)
    };
    if bytes < KIB {
        format!("{bytes} B")
    } else if bytes < MIB {
        format!("{} KiB", tenths(KIB))
    } else {
        format!("{} MiB", tenths(MIB))
    }
}

/// Saves `content` in `dir` under the safe name `name` (see
/// [`sanitize_name`]), or under `name (1)`, `name (2)`, … before the
/// extension when that is taken; returns the path.
///
/// `dir` is created (mode 0700) when missing.  The content goes into a new
/// hidden file (mode 0600, created exclusively, so a symbolic link there is
/// never followed) and is flushed to disk; then the file is hard-linked to
/// its final name, which fails rather than replaces when anything (a file,
/// a directory, a symbolic link) has that name, and the temporary name is
/// removed.  On a file system without hard links the file is renamed
/// instead, after checking that the name is free.
pub fn save(dir: &Path, name: &str, content: &[u8]) -> std::io::Result<PathBuf> {
    let name = sanitize_name(name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let temp = dir.join(temp_name()?);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        f.write_all(content)?;
        f.sync_all()
    })();
    let placed = written.and_then(|()| place(dir, &temp, &name));
    let _ = std::fs::remove_file(&temp);
    let path = placed?;
    // The new name is durable once the directory is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

/// Gives `temp` (in `dir`) the first free name of `name`, `name (1)`, …
fn place(dir: &Path, temp: &Path, name: &str) -> std::io::Result<PathBuf> {
    for n in 0..=MAX_NUMBERED {
        let target = dir.join(numbered(name, n));
        match std::fs::hard_link(temp, &target) {
            Ok(()) => return Ok(target),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(link_error) => {
                // No hard links here (some file systems have none): rename,
                // if nothing has the name.
                match std::fs::symlink_metadata(&target) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        std::fs::rename(temp, &target)?;
                        return Ok(target);
                    }
                    Err(_) => return Err(link_error),
                }
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{name} and {MAX_NUMBERED} numbered names beside it are taken"),
    ))
}

/// A fresh hidden temporary name: `.quicnprotochat-` and 16 random hex
/// characters, `.part`.  Safe names never start with a dot, so it is never
/// a received file's name.
fn temp_name() -> std::io::Result<String> {
    let mut r = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r)
        .map_err(|_| std::io::Error::other("the system random number generator failed"))?;
    let mut name = String::from(".quicnprotochat-");
    for b in r {
        let _ = write!(name, "{b:02x}");
    }
    name.push_str(".part");
    Ok(name)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn directory_parts_are_stripped_whatever_the_separator() {
        for (raw, safe) in [
            ("../../etc/passwd", "passwd"),
            ("/abs/path", "path"),
            ("..\\..\\x", "x"),
            ("C:\\Users\\me\\report.pdf", "report.pdf"),
            ("dir/sub/", "sub"),
            ("a/..", FALLBACK_NAME),
            ("..", FALLBACK_NAME),
            (".", FALLBACK_NAME),
            ("/", FALLBACK_NAME),
            ("", FALLBACK_NAME),
            ("plain.txt", "plain.txt"),
        ] {
            assert_eq!(sanitize_name(raw), safe, "{raw:?}");
        }
    }

    #[test]
    fn hidden_files_and_option_lookalikes_lose_their_leading_characters() {
        assert_eq!(sanitize_name(".bashrc"), "bashrc");
        assert_eq!(sanitize_name("...secret"), "secret");
        assert_eq!(sanitize_name("-rf"), "rf");
        assert_eq!(sanitize_name("  . -x.txt  "), "x.txt");
        assert_eq!(sanitize_name("keep.dots."), "keep.dots.");
    }

    #[test]
    fn control_and_formatting_characters_become_underscores() {
        assert_eq!(sanitize_name("a\0b"), "a_b");
        assert_eq!(sanitize_name("line\nbreak\r.txt"), "line_break_.txt");
        assert_eq!(sanitize_name("\u{1b}[31mred\u{1b}[0m"), "_[31mred_[0m");
        assert_eq!(sanitize_name("tab\there\u{7f}\u{9b}"), "tab_here__");
        // Bidirectional overrides: "invoice\u{202E}fdp.exe" shows as
        // "invoiceexe.pdf".
        assert_eq!(sanitize_name("invoice\u{202E}fdp.exe"), "invoice_fdp.exe");
        for c in ('\u{202A}'..='\u{202E}').chain('\u{2066}'..='\u{2069}') {
            assert_eq!(
                sanitize_name(&format!("a{c}b")),
                "a_b",
                "U+{:04X}",
                c as u32
            );
        }
        for c in [
            '\u{200B}', '\u{200E}', '\u{200F}', '\u{061C}', '\u{FEFF}', '\u{2028}',
        ] {
            assert_eq!(
                sanitize_name(&format!("a{c}b")),
                "a_b",
                "U+{:04X}",
                c as u32
            );
        }
        // Ordinary non-ASCII letters stay.
        assert_eq!(sanitize_name("café €.txt"), "café €.txt");
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary_keeping_the_extension() {
        let long = format!("{}.tar", "é".repeat(300));
        let safe = sanitize_name(&long);
        assert!(safe.len() <= MAX_NAME_BYTES, "{}", safe.len());
        assert!(safe.ends_with("é.tar"), "{safe}");
        let no_ext = "x".repeat(1000);
        assert_eq!(sanitize_name(&no_ext), "x".repeat(MAX_NAME_BYTES));
        // An "extension" too long to be one is not kept.
        let odd = format!("a.{}", "b".repeat(500));
        assert_eq!(sanitize_name(&odd).len(), MAX_NAME_BYTES);
    }

    #[test]
    fn a_safe_name_is_its_own_safe_name() {
        let long = "é".repeat(300);
        for raw in [
            "../../etc/passwd",
            " .\u{1b}[2J -x ",
            "a\u{202E}b.txt",
            "..",
            "",
            "x. ",
            long.as_str(),
            &format!("{long}.tar"),
            &format!("a.{}", "b".repeat(500)),
            &format!("{} .txt", "c".repeat(400)),
        ] {
            let safe = sanitize_name(raw);
            assert_eq!(sanitize_name(&safe), safe, "{raw:?}");
            assert!(!safe.is_empty() && safe.len() <= MAX_NAME_BYTES, "{raw:?}");
            assert!(
                !safe.starts_with(['.', '-', ' ']) && !safe.ends_with(' '),
                "{safe:?}"
            );
        }
    }

    #[test]
    fn media_types_are_plain_type_slash_subtype_or_the_default() {
        assert_eq!(sanitize_media_type("text/plain"), "text/plain");
        assert_eq!(sanitize_media_type("Image/SVG+XML"), "image/svg+xml");
        for bad in [
            "",
            "text",
            "text/",
            "/plain",
            "text/plain; charset=utf-8",
            "text/pl\u{1b}[2Jain",
            "a/b/c",
            &format!("x/{}", "y".repeat(200)),
        ] {
            assert_eq!(sanitize_media_type(bad), DEFAULT_MEDIA_TYPE, "{bad:?}");
        }
        assert_eq!(media_type_for("a.TXT"), "text/plain");
        assert_eq!(media_type_for("photo.jpeg"), "image/jpeg");
        assert_eq!(media_type_for("noext"), DEFAULT_MEDIA_TYPE);
        assert_eq!(media_type_for("x.unknown"), DEFAULT_MEDIA_TYPE);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(12_595), "12.3 KiB");
        assert_eq!(human_size(MAX_FILE_BYTES as u64), "512.0 KiB");
        assert_eq!(human_size(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn checks_refuse_wrong_size_wrong_hash_and_too_much() {
        let content = b"hello";
        let hash = sha256_hex(content);
        assert_eq!(
            hash,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(check(5, &hash, content), Ok(()));
        assert_eq!(check(6, &hash, content), Err(Refusal::SizeMismatch));
        assert_eq!(
            check(5, &sha256_hex(b"other"), content),
            Err(Refusal::HashMismatch)
        );
        assert_eq!(
            check(5, &hash.to_uppercase(), content),
            Err(Refusal::HashMismatch)
        );
        let big = vec![0u8; MAX_FILE_BYTES + 1];
        assert_eq!(
            check(big.len() as u64, &sha256_hex(&big), &big),
            Err(Refusal::TooLarge)
        );
    }

    #[test]
    fn saving_never_overwrites_and_numbers_before_the_extension() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("downloads");
        let first = save(&dir, "notes.txt", b"one").unwrap();
        let second = save(&dir, "notes.txt", b"two").unwrap();
        let third = save(&dir, "notes.txt", b"three").unwrap();
        assert_eq!(first, dir.join("notes.txt"));
        assert_eq!(second, dir.join("notes (1).txt"));
        assert_eq!(third, dir.join("notes (2).txt"));
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        assert_eq!(std::fs::read(&second).unwrap(), b"two");
        assert_eq!(
            save(&dir, "README", b"x").unwrap(),
            dir.join("README"),
            "no extension"
        );
        assert_eq!(save(&dir, "README", b"y").unwrap(), dir.join("README (1)"));
        // The directory is private, the files are the owner's alone, and no
        // temporary file is left.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&first), 0o600);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "README",
                "README (1)",
                "notes (1).txt",
                "notes (2).txt",
                "notes.txt"
            ]
        );
    }

    #[test]
    fn a_symbolic_link_in_the_way_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("downloads");
        std::fs::create_dir(&dir).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("x.txt")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), dir.join("x (1).txt")).unwrap();
        let saved = save(&dir, "x.txt", b"attack").unwrap();
        assert_eq!(saved, dir.join("x (2).txt"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!tmp.path().join("nowhere").exists());
        // A hostile name cannot leave the directory either.
        let saved = save(&dir, "../victim", b"attack").unwrap();
        assert_eq!(saved, dir.join("victim"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn a_download_directory_that_cannot_be_made_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        assert!(save(&file, "a.txt", b"x").is_err());
        assert!(save(&file.join("sub"), "a.txt", b"x").is_err());
    }

    #[test]
    fn summaries_say_what_became_of_the_file() {
        let mut info = FileInfo {
            name: "a.txt".into(),
            media_type: "text/plain".into(),
            size: 2048,
            sha256: sha256_hex(b""),
            status: FileStatus::Sent,
        };
        assert_eq!(info.summary(), "[file] a.txt (2.0 KiB, text/plain)");
        info.status = FileStatus::Saved {
            path: "/d/a (1).txt".into(),
        };
        assert_eq!(
            info.summary(),
            "[file] a.txt (2.0 KiB, text/plain) saved to /d/a (1).txt"
        );
        info.status = FileStatus::Refused {
            reason: Refusal::HashMismatch.to_string(),
        };
        assert_eq!(
            info.summary(),
            "[file] a.txt refused: its content does not match its SHA-256"
        );
    }
}
