//! Files: sent whole inside an MLS application message through a real
//! server, checked and saved by the receiver in its download directory
//! under a safe name, never over an existing file; refused before sending
//! when too large or not a regular file; and a hostile sender's names and
//! contents never write outside the download directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use quicnprotochat_client::harness::{TestServer, message_texts};
use quicnprotochat_client::{Client, Event, FileInfo, FileStatus, Messenger, MessengerError};
use quicnprotochat_core::file::{MAX_FILE_BYTES, sha256_hex};
use quicnprotochat_core::message::{Content, FileContent};
use quicnprotochat_core::{Profile, ProfileKey, StoredMessage};

use crate::cli::{alice_invited_bob, cli, run_ok};

/// Bytes of every value, in an order that is not a pattern.
fn content(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// The messages among `events` that carry a file.
fn files(events: Vec<Event>) -> Vec<StoredMessage> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.file.is_some() => Some(m),
            _ => None,
        })
        .collect()
}

fn file_of(m: &StoredMessage) -> &FileInfo {
    m.file.as_ref().unwrap()
}

fn saved_path(m: &StoredMessage) -> PathBuf {
    match &file_of(m).status {
        FileStatus::Saved { path } => path.clone(),
        other => panic!("not saved: {other:?} ({})", m.text),
    }
}

/// Every path under `root`, relative to it.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            out.insert(path.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                todo.push(path);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_file_goes_through_the_server_and_arrives_whole_in_the_download_directory() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.pdf");
    let bytes = content(300 * 1024);
    std::fs::write(&path, &bytes).unwrap();

    let sent = alice.send_file("g", &path).await.unwrap();
    assert_eq!(sent.name, "report.pdf");
    assert_eq!(sent.media_type, "application/pdf");
    assert_eq!(sent.size, bytes.len() as u64);
    assert_eq!(sent.sha256, sha256_hex(&bytes));
    assert_eq!(sent.status, FileStatus::Sent);
    assert_eq!(
        sent.summary(),
        "[file] report.pdf (300.0 KiB, application/pdf)"
    );

    let [m] = files(bob.sync().await.unwrap()).try_into().unwrap();
    assert_eq!(m.sender, "alice");
    let got = file_of(&m);
    assert_eq!((got.name.as_str(), got.size), ("report.pdf", sent.size));
    assert_eq!(got.sha256, sent.sha256);
    let saved = saved_path(&m);
    let downloads = bob.download_dir().await.unwrap();
    assert!(downloads.is_absolute(), "{}", downloads.display());
    assert!(
        downloads.ends_with("profiles/bob/downloads"),
        "the default download directory is in the profile: {}",
        downloads.display()
    );
    assert_eq!(saved, downloads.join("report.pdf"));
    let received = std::fs::read(&saved).unwrap();
    assert_eq!(sha256_hex(&received), sent.sha256);
    assert!(received == bytes, "the bytes differ");
    assert_eq!(
        m.text,
        format!(
            "[file] report.pdf (300.0 KiB, application/pdf) saved to {}",
            saved.display()
        )
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&downloads), 0o700);
        assert_eq!(mode(&saved), 0o600);
    }

    // Both histories keep the file, as it was sent and as it arrived.
    let [mine] = alice.history("g", 1).await.unwrap().try_into().unwrap();
    assert_eq!(mine.file.as_ref(), Some(&sent));
    assert_eq!(mine.text, sent.summary());
    let [theirs] = bob.history("g", 1).await.unwrap().try_into().unwrap();
    assert_eq!(theirs.file, m.file);
    assert_eq!(theirs.text, m.text);
}

#[tokio::test]
async fn a_name_that_is_taken_gets_a_number_and_nothing_is_overwritten() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    let downloads = tempfile::tempdir().unwrap();
    let dl = downloads.path().join("in");
    bob.set_download_dir(&dl).await.unwrap();
    std::fs::create_dir(&dl).unwrap();
    std::fs::write(dl.join("notes.txt"), b"bob's own notes").unwrap();

    let src = tempfile::tempdir().unwrap();
    for (i, text) in ["first", "second"].iter().enumerate() {
        let d = src.path().join(i.to_string());
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("notes.txt"), text).unwrap();
        alice.send_file("g", &d.join("notes.txt")).await.unwrap();
    }
    let got = files(bob.sync().await.unwrap());
    let paths: Vec<PathBuf> = got.iter().map(saved_path).collect();
    assert_eq!(
        paths,
        [dl.join("notes (1).txt"), dl.join("notes (2).txt")],
        "{got:?}"
    );
    assert_eq!(
        std::fs::read(dl.join("notes.txt")).unwrap(),
        b"bob's own notes"
    );
    assert_eq!(std::fs::read(&paths[0]).unwrap(), b"first");
    assert_eq!(std::fs::read(&paths[1]).unwrap(), b"second");
    assert_eq!(
        got.iter()
            .map(|m| file_of(m).media_type.as_str())
            .collect::<Vec<_>>(),
        ["text/plain", "text/plain"]
    );
}

#[tokio::test]
async fn the_limit_and_non_files_are_refused_before_anything_is_sent() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let big = dir.path().join("big.bin");
    std::fs::write(&big, content(MAX_FILE_BYTES + 1)).unwrap();
    let e = alice.send_file("g", &big).await.unwrap_err();
    assert!(
        matches!(&e, MessengerError::FileTooLarge { size, .. } if *size == MAX_FILE_BYTES as u64 + 1),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("512 KiB") && text.contains("524288"),
        "{text}"
    );

    let e = alice.send_file("g", dir.path()).await.unwrap_err();
    assert!(matches!(e, MessengerError::NotAFile(_)), "{e:?}");
    // A FIFO with no writer would block whoever opens it for reading: it is
    // refused without being opened.
    let fifo = dir.path().join("pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let e = alice.send_file("g", &fifo).await.unwrap_err();
    assert!(matches!(e, MessengerError::NotAFile(_)), "{e:?}");
    let e = alice
        .send_file("g", &dir.path().join("missing"))
        .await
        .unwrap_err();
    assert!(matches!(e, MessengerError::ReadFile { .. }), "{e:?}");
    assert!(
        message_texts(bob.sync().await.unwrap()).is_empty(),
        "nothing was sent"
    );

    // Exactly the limit goes through.
    let max = dir.path().join("max.bin");
    let bytes = content(MAX_FILE_BYTES);
    std::fs::write(&max, &bytes).unwrap();
    alice.send_file("g", &max).await.unwrap();
    let [m] = files(bob.sync().await.unwrap()).try_into().unwrap();
    assert!(std::fs::read(saved_path(&m)).unwrap() == bytes);
}

#[tokio::test]
async fn a_file_that_cannot_be_written_is_reported_and_the_queue_goes_on() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A download directory under a regular file can never be made.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"").unwrap();
    bob.set_download_dir(&blocker.join("downloads"))
        .await
        .unwrap();
    let path = dir.path().join("a.txt");
    std::fs::write(&path, b"lost").unwrap();
    alice.send_file("g", &path).await.unwrap();
    alice.send("g", "after the file").await.unwrap();

    let events = bob.sync().await.unwrap();
    let texts = message_texts(events.clone());
    let [m] = files(events).try_into().unwrap();
    assert!(
        matches!(&file_of(&m).status, FileStatus::NotSaved { reason } if !reason.is_empty()),
        "{m:?}"
    );
    assert!(
        m.text
            .starts_with("[file] a.txt (4 B, text/plain) could not be saved: "),
        "{}",
        m.text
    );
    assert_eq!(texts[1], "after the file");
    // Nothing is retried or left behind, and the next file lands once the
    // directory is usable.
    bob.set_download_dir(&dir.path().join("ok")).await.unwrap();
    alice.send_file("g", &path).await.unwrap();
    let [m] = files(bob.sync().await.unwrap()).try_into().unwrap();
    assert_eq!(std::fs::read(saved_path(&m)).unwrap(), b"lost");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"");
}

/// A member whose client is the bare library: it sends whatever content
/// it crafts.
struct Hostile {
    profile: Profile,
    client: Client,
    _dir: tempfile::TempDir,
}

impl Hostile {
    /// Registers `mallory`, creates `group` and adds `victim` to it.
    async fn join(server: &TestServer, victim: &Messenger, group: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut profile = Profile::create(
            &dir.path().join("mallory"),
            &ProfileKey::Passphrase("mallory".into()),
            "mallory",
        )
        .unwrap();
        let client = server.connect_as(profile.identity()).await.unwrap();
        client.register("mallory").await.unwrap();
        profile.create_group(group).unwrap();
        let (kp, _) = client
            .fetch_key_package(victim.identity_key().await)
            .await
            .unwrap();
        let out = profile
            .add_member(group, &kp, victim.identity_key().await)
            .unwrap();
        profile.confirm_commit(&out.group_id).unwrap();
        let w = out.welcome.unwrap();
        client
            .enqueue(&w.recipients, w.message_id, w.payload)
            .await
            .unwrap();
        Self {
            profile,
            client,
            _dir: dir,
        }
    }

    async fn send(&mut self, group: &str, content: Content) {
        let out = self.profile.send_content(group, content).unwrap();
        self.client
            .enqueue(&out.recipients, out.message_id, out.payload)
            .await
            .unwrap();
    }
}

/// A file whose declared size and hash are right.
fn honest(name: &str, media_type: &str, bytes: &[u8]) -> Content {
    Content::File {
        name: name.into(),
        media_type: media_type.into(),
        size: bytes.len() as u64,
        sha256: sha256_hex(bytes),
        content: FileContent(bytes.to_vec()),
    }
}

#[tokio::test]
async fn a_hostile_sender_cannot_write_outside_the_download_directory() {
    let server = TestServer::start().unwrap();
    let bob = server.messenger("bob").await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let downloads = root.path().join("home/bob/downloads");
    std::fs::create_dir_all(root.path().join("home/etc")).unwrap();
    std::fs::create_dir_all(root.path().join("home/bob")).unwrap();
    std::fs::write(root.path().join("home/etc/passwd"), b"root:x:0:0").unwrap();
    bob.set_download_dir(&downloads).await.unwrap();
    let before = tree(root.path());

    let mut mallory = Hostile::join(&server, &bob, "evil").await;
    let long = format!("{}.txt", "a".repeat(5000));
    let names = [
        ("../../etc/passwd", "passwd"),
        ("/abs/path", "path"),
        ("..\\..\\x", "x"),
        ("two\nlines.txt", "two_lines.txt"),
        ("\u{1b}[2J\u{1b}[31mred.txt", "_[2J_[31mred.txt"),
        (".bashrc", "bashrc"),
        ("invoice\u{202E}fdp.exe", "invoice_fdp.exe"),
        ("nul\0byte", "nul_byte"),
        ("..", "file"),
        ("", "file (1)"),
        (long.as_str(), ""),
    ];
    for (i, (name, _)) in names.iter().enumerate() {
        mallory
            .send(
                "evil",
                honest(name, "text/x\u{1b}[2Jevil", &[b'0' + i as u8]),
            )
            .await;
    }
    // Contents that are not what they claim are refused.
    let mut wrong_hash = honest("wrong-hash.txt", "text/plain", b"abc");
    if let Content::File { sha256, .. } = &mut wrong_hash {
        *sha256 = sha256_hex(b"abd");
    }
    mallory.send("evil", wrong_hash).await;
    let mut wrong_size = honest("wrong-size.txt", "text/plain", b"abc");
    if let Content::File { size, .. } = &mut wrong_size {
        *size = 2;
    }
    mallory.send("evil", wrong_size).await;
    let too_big = vec![7u8; MAX_FILE_BYTES + 1];
    mallory
        .send(
            "evil",
            honest("too-big.bin", "application/octet-stream", &too_big),
        )
        .await;

    let got = files(bob.sync().await.unwrap());
    assert_eq!(got.len(), names.len() + 3, "{got:#?}");
    for (m, (name, safe)) in got.iter().zip(names) {
        let path = saved_path(m);
        assert_eq!(path.parent(), Some(downloads.as_path()), "{name:?}");
        let file_name = path.file_name().unwrap().to_str().unwrap();
        if safe.is_empty() {
            assert!(
                file_name.len() <= 200 && file_name.ends_with("a.txt"),
                "{file_name}"
            );
        } else {
            assert_eq!(file_name, safe, "{name:?}");
        }
        // Nothing unsafe reaches the screen.
        assert!(!m.text.chars().any(char::is_control), "{:?}", m.text);
        assert!(!m.text.contains('\u{202E}'), "{:?}", m.text);
        assert_eq!(file_of(m).media_type, "application/octet-stream");
    }
    let refused: Vec<&str> = got[names.len()..].iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        refused,
        [
            "[file] wrong-hash.txt refused: its content does not match its SHA-256",
            "[file] wrong-size.txt refused: its declared size is not the size of its content",
            "[file] too-big.bin refused: it is larger than the limit of 512 KiB (524288 bytes)",
        ]
    );
    for m in &got[names.len()..] {
        assert!(
            matches!(file_of(m).status, FileStatus::Refused { .. }),
            "{m:?}"
        );
    }

    // What changed is inside the download directory, and nothing else.
    let after = tree(root.path());
    let added: Vec<&PathBuf> = after.difference(&before).collect();
    assert!(
        added
            .iter()
            .all(|p| root.path().join(p).starts_with(&downloads)),
        "{added:?}"
    );
    assert_eq!(
        std::fs::read_dir(&downloads).unwrap().count(),
        names.len(),
        "one file per accepted name, none for the refused, no temporary file left"
    );
    assert_eq!(
        std::fs::read(root.path().join("home/etc/passwd")).unwrap(),
        b"root:x:0:0"
    );
    assert!(!Path::new("/abs/path").exists());
}

#[test]
fn the_command_line_sends_shows_and_lists_a_file() {
    let server = TestServer::start().unwrap();
    let (dir, alice, bob) = alice_invited_bob(&server);
    run_ok(cli(&server, &bob).args(["sync"]));

    let file = dir.path().join("hello world.txt");
    std::fs::write(&file, b"hello from the command line\n").unwrap();
    let out = run_ok(
        cli(&server, &alice)
            .args(["send-file", "friends"])
            .arg(&file),
    );
    assert_eq!(
        out.trim(),
        "sent [file] hello world.txt (28 B, text/plain) to friends"
    );

    let downloads = dir.path().join("bob-files");
    let out = run_ok(
        cli(&server, &bob)
            .args(["--json", "--download-dir"])
            .arg(&downloads)
            .arg("sync"),
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["event"] == "message")
        .collect();
    let [line] = lines.as_slice() else {
        panic!("{out}")
    };
    let saved = downloads.join("hello world.txt");
    assert_eq!(line["sender"], "alice");
    assert_eq!(line["file"]["name"], "hello world.txt");
    assert_eq!(line["file"]["media_type"], "text/plain");
    assert_eq!(line["file"]["size"], 28);
    assert_eq!(
        line["file"]["sha256"],
        sha256_hex(b"hello from the command line\n")
    );
    assert_eq!(line["file"]["status"], "saved");
    assert_eq!(line["file"]["path"], saved.display().to_string());
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        b"hello from the command line\n"
    );

    let history = run_ok(cli(&server, &bob).args(["history", "friends"]));
    assert_eq!(
        history.trim(),
        format!(
            "[friends] alice: [file] hello world.txt (28 B, text/plain) saved to {}",
            saved.display()
        )
    );

    // Over the limit: an error naming the limit, nothing sent.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![0u8; MAX_FILE_BYTES + 1]).unwrap();
    let out = cli(&server, &alice)
        .args(["send-file", "friends"])
        .arg(&big)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("files are limited to 512 KiB (524288 bytes)"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    let synced = run_ok(cli(&server, &bob).args(["sync"]));
    assert_eq!(synced.trim(), "", "nothing was sent");

    // In `chat`, `/send-file PATH` sends a file (the lines are taken in
    // order: `/quit` comes once the file is sent).
    let reply = dir.path().join("reply.md");
    std::fs::write(&reply, b"# thanks\n").unwrap();
    let mut chat = cli(&server, &bob)
        .args(["chat", "friends"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let stdin = chat.stdin.as_mut().unwrap();
        writeln!(stdin, "/send-file {}", reply.display()).unwrap();
        writeln!(stdin, "/quit").unwrap();
    }
    let out = chat.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sent [file] reply.md (9 B, text/markdown) to friends"),
        "{stdout}"
    );
    let alice_downloads = alice.join("downloads");
    assert_eq!(
        run_ok(cli(&server, &alice).args(["sync"])).trim(),
        format!(
            "[friends] bob: [file] reply.md (9 B, text/markdown) saved to {}",
            alice_downloads.join("reply.md").display()
        )
    );
    assert_eq!(
        std::fs::read(alice_downloads.join("reply.md")).unwrap(),
        b"# thanks\n"
    );
}
