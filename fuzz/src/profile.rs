//! Target `profile_process`: a client processing a payload delivered to it,
//! as a member of a group: Welcome, commit, proposal or application message.
//!
//! The member is Bob's profile in `fixtures/member-profile/`, written by the seed writer
//! together with the seeds of this target: Bob is in Alice's group "g", and
//! holds an unused key package that a seeded Welcome (to group "h") is for,
//! so the seeds go as deep as real messages go.  An input that changes the
//! profile (`process` returned `Ok`) is followed by a fresh copy of the
//! fixture; one that fails changes nothing, which is the code's own
//! guarantee and is not re-checked here.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use quicnprotochat_core::{Profile, ProfileKey};

/// Raw SQLCipher key of the fixture profile (no secret: a test fixture).
pub const FIXTURE_KEY: [u8; 32] = *b"quicnprotochat fuzz fixture key!";

/// The fixture profile's directory, relative to the fuzz crate.
pub const FIXTURE_DIR: &str = "fixtures/member-profile";

/// Delivery message id every input is processed under (never one the
/// fixture has seen).
pub const MESSAGE_ID: [u8; 16] = [0xF0; 16];

/// Where the fuzz crate's committed files are.
pub fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A profile directory's files, by name.
pub type Files = Vec<(std::ffi::OsString, Vec<u8>)>;

/// Reads the regular files of a profile directory.
pub fn read_files(dir: &Path) -> std::io::Result<Files> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push((entry.file_name(), std::fs::read(entry.path())?));
        }
    }
    files.sort();
    Ok(files)
}

fn fixture() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = fuzz_dir().join(FIXTURE_DIR);
        read_files(&dir).unwrap_or_else(|e| {
            panic!(
                "reading {}: {e}; write it with the seed writer",
                dir.display()
            )
        })
    })
}

/// An open copy of a profile in its own temporary directory.
pub struct Member {
    _dir: tempfile::TempDir,
    /// Bob's profile.
    pub profile: Profile,
}

impl Member {
    /// Opens a fresh copy of the profile made of `files`.
    pub fn open(files: &Files) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let home = dir.path().join("bob");
        std::fs::create_dir(&home).expect("profile directory");
        for (name, bytes) in files {
            std::fs::write(home.join(name), bytes).expect("profile file");
        }
        let profile = Profile::open(&home, &ProfileKey::Raw(FIXTURE_KEY)).unwrap_or_else(|e| {
            panic!("the fixture profile does not open ({e}); write it again with the seed writer")
        });
        Self { _dir: dir, profile }
    }
}

/// Processes `data` as a payload delivered to Bob.
pub fn check(data: &[u8]) {
    static LIVE: Mutex<Option<Member>> = Mutex::new(None);
    // A panic is the end of the process under libFuzzer; nothing to recover.
    let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
    let member = live.get_or_insert_with(|| Member::open(fixture()));
    if member.profile.process(&MESSAGE_ID, data).is_ok() {
        *live = None;
    }
}
