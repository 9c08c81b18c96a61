//! The full-screen client: each view rendered with ratatui's `TestBackend`,
//! the input line's editing and commands, and two real `tui` processes
//! chatting through a real server inside tmux, read as a person would.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use quicnprotochat_client::harness::{TEST_TOKEN, TestServer};
use quicnprotochat_client::tui::app::{Action, App, Link, MemberLine};
use quicnprotochat_client::tui::ui;
use quicnprotochat_client::{Event, FileInfo, FileStatus};
use quicnprotochat_core::{IdentityKey, StoredMessage, Verification};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;

use crate::cli::alice_invited_bob;

const CLI: &str = env!("CARGO_BIN_EXE_quicnprotochat");

fn key() -> IdentityKey {
    quicnprotochat_core::Identity::generate()
        .unwrap()
        .public_key()
}

fn message(group: &str, sender: &str, text: &str, minute: u64) -> Event {
    Event::Message(StoredMessage {
        group: group.into(),
        sender: sender.into(),
        sender_key: key(),
        sent_at_ms: (12 * 60 + minute) * 60_000,
        received_at_ms: 0,
        text: text.into(),
        message_id: "00".into(),
        file: None,
    })
}

fn render(app: &App, w: u16, h: u16) -> Buffer {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(f, app)).unwrap();
    t.backend().buffer().clone()
}

fn text(b: &Buffer) -> String {
    let area = b.area;
    (0..area.height)
        .map(|y| {
            (0..area.width)
                .map(|x| b[(x, y)].symbol().to_string())
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn press(app: &mut App, code: KeyCode) -> Option<Action> {
    app.on_key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn type_text(app: &mut App, s: &str) -> Option<Action> {
    let mut last = None;
    for c in s.chars() {
        last = press(app, KeyCode::Char(c));
    }
    last
}

/// Two groups, messages in both, members in every verification state.
fn sample() -> App {
    let mut app = App::new("alice", true);
    app.group_mut("friends");
    app.group_mut("work");
    app.select("friends");
    app.on_event(&message("friends", "bob", "hello alice", 34));
    app.on_event(&message("work", "carol", "standup?", 35));
    app.on_event(&message("work", "carol", "in 5", 36));
    app.set_members(
        "friends",
        vec![
            MemberLine {
                username: "alice".into(),
                state: None,
            },
            MemberLine {
                username: "bob".into(),
                state: Some(Verification::Verified),
            },
            MemberLine {
                username: "dave".into(),
                state: Some(Verification::Unverified),
            },
            MemberLine {
                username: "eve".into(),
                state: Some(Verification::Changed { verified: key() }),
            },
        ],
    );
    app
}

#[test]
fn the_screen_shows_groups_with_unread_counts_messages_and_members() {
    let app = sample();
    let b = render(&app, 80, 24);
    let screen = text(&b);
    assert!(screen.contains(">friends"), "{screen}");
    assert!(screen.contains(" work (2)"), "{screen}");
    assert!(screen.contains("12:34 bob: hello alice"), "{screen}");
    assert!(
        !screen.contains("standup?"),
        "another group's message: {screen}"
    );
    assert!(screen.contains("*alice"), "{screen}");
    assert!(screen.contains("✓bob"), "{screen}");
    assert!(screen.contains(" dave"), "{screen}");
    assert!(screen.contains("!eve"), "{screen}");
    assert!(screen.contains("alice | "), "status line: {screen}");

    // Switching groups shows the other's messages and clears its count.
    let mut app = app;
    app.on_key(KeyEvent::new(KeyCode::Char('n'), KeyModifiers::CONTROL));
    let screen = text(&render(&app, 80, 24));
    assert!(screen.contains("12:35 carol: standup?"), "{screen}");
    assert!(screen.contains(">work"), "{screen}");
    assert!(!screen.contains("(2)"), "{screen}");
}

#[test]
fn a_changed_key_is_a_red_warning_and_colours_go_with_no_color() {
    let mut app = sample();
    let (fake, real) = (key(), key());
    app.on_event(&Event::VerifiedKeyChanged {
        group: "friends".into(),
        member: "bob".into(),
        key: fake,
        verified: real,
    });
    let b = render(&app, 100, 24);
    let screen = text(&b);
    assert!(
        screen.contains("! WARNING: bob now has the identity key"),
        "{screen}"
    );
    // The warning is red, and so is the changed member.
    let red = (0..b.area.height)
        .flat_map(|y| (0..b.area.width).map(move |x| (x, y)))
        .filter(|p| b[*p].fg == Color::Red)
        .count();
    assert!(red > 10, "{red} red cells");

    app.color = false;
    let b = render(&app, 100, 24);
    let coloured = (0..b.area.height)
        .flat_map(|y| (0..b.area.width).map(move |x| (x, y)))
        .filter(|p| b[*p].fg != Color::Reset || b[*p].bg != Color::Reset)
        .count();
    assert_eq!(coloured, 0, "NO_COLOR leaves no colour");
}

#[test]
fn scrollback_pages_through_history_and_long_lines_wrap() {
    let mut app = App::new("alice", true);
    app.group_mut("g");
    for i in 0..100 {
        app.on_event(&message("g", "bob", &format!("line {i}"), 0));
    }
    app.on_event(&message("g", "bob", &"x".repeat(150), 1));
    let screen = text(&render(&app, 80, 24));
    assert!(screen.contains("line 99"), "{screen}");
    assert!(!screen.contains("line 80"), "{screen}");
    // The 150-character line wraps onto several rows, every x kept.
    assert_eq!(screen.matches('x').count(), 150, "{screen}");

    press(&mut app, KeyCode::PageUp);
    press(&mut app, KeyCode::PageUp);
    let screen = text(&render(&app, 80, 24));
    assert!(screen.contains("scrolled back 20 lines"), "{screen}");
    assert!(screen.contains("line 80"), "{screen}");
    assert!(!screen.contains("line 99"), "{screen}");
    // A message arriving while scrolled back does not move the view.
    app.on_event(&message("g", "bob", "newest", 2));
    let again = text(&render(&app, 80, 24));
    assert!(
        again.contains("line 80") && !again.contains("newest"),
        "{again}"
    );
    for _ in 0..3 {
        press(&mut app, KeyCode::PageDown);
    }
    let screen = text(&render(&app, 80, 24));
    assert!(screen.contains("newest"), "{screen}");
}

#[test]
fn offline_shows_on_the_status_line_and_small_screens_still_draw() {
    let mut app = sample();
    app.on_event(&Event::Disconnected {
        reason: "the connection to the server was lost".into(),
    });
    app.unsent.push(("friends".into(), "later".into()));
    let screen = text(&render(&app, 80, 24));
    assert!(screen.contains("OFFLINE"), "{screen}");
    assert!(
        screen.contains("OFFLINE, reconnecting; 1 unsent"),
        "{screen}"
    );
    app.on_event(&Event::Reconnected);
    assert_eq!(app.link, Link::Online);
    // Narrow and tiny terminals: the side panes go, nothing panics.
    let narrow = text(&render(&app, 40, 12));
    assert!(narrow.contains("hello alice"), "{narrow}");
    let _ = render(&app, 5, 3);
}

#[test]
fn a_received_file_shows_as_a_line_with_its_name_size_and_place() {
    let mut app = sample();
    let info = FileInfo {
        name: "photo.png".into(),
        media_type: "image/png".into(),
        size: 12_595,
        sha256: "00".repeat(32),
        status: FileStatus::Saved {
            path: "/home/bob/dl/photo.png".into(),
        },
    };
    let Event::Message(mut m) = message("friends", "bob", &info.summary(), 40) else {
        unreachable!()
    };
    m.file = Some(info);
    app.on_event(&Event::Message(m));
    let refused = FileInfo {
        name: "_[2Jx.txt".into(),
        media_type: "text/plain".into(),
        size: 3,
        sha256: "00".repeat(32),
        status: FileStatus::Refused {
            reason: "its content does not match its SHA-256".into(),
        },
    };
    app.on_event(&message("friends", "eve", &refused.summary(), 41));
    let b = render(&app, 160, 24);
    let screen = text(&b);
    assert!(
        screen.contains(
            "12:40 bob: [file] photo.png (12.3 KiB, image/png) saved to /home/bob/dl/photo.png"
        ),
        "{screen}"
    );
    assert!(
        screen.contains(
            "12:41 eve: [file] _[2Jx.txt refused: its content does not match its SHA-256"
        ),
        "{screen}"
    );
    // Without colours it reads the same.
    app.color = false;
    assert_eq!(text(&render(&app, 160, 24)), screen);
}

#[test]
fn send_file_takes_the_rest_of_the_line_and_tab_completes_paths() {
    let mut app = sample();
    type_text(&mut app, "/send-file  ~/my notes/a b.txt ");
    assert_eq!(
        press(&mut app, KeyCode::Enter),
        Some(Action::SendFile {
            group: "friends".into(),
            path: "~/my notes/a b.txt".into(),
        })
    );
    type_text(&mut app, "/send-file");
    assert_eq!(press(&mut app, KeyCode::Enter), None);
    assert!(app.status.contains("/send-file PATH"), "{}", app.status);

    // The command itself completes like the others.
    type_text(&mut app, "/se");
    press(&mut app, KeyCode::Tab);
    assert_eq!(app.input, "/send-file ");
    assert_eq!(app.path_being_typed(), Some(""));
    // Paths complete from the names the event loop lists.
    type_text(&mut app, "docs/re");
    assert_eq!(app.path_being_typed(), Some("docs/re"));
    let names: Vec<String> = ["readme.md", "report-2024.pdf", "report-2025.pdf", "src/"]
        .map(String::from)
        .to_vec();
    app.complete_path(&names);
    assert_eq!(
        app.input, "/send-file docs/re",
        "two ways on: nothing added"
    );
    assert!(
        app.status.contains("readme.md  report-2024.pdf"),
        "{}",
        app.status
    );
    type_text(&mut app, "p");
    app.complete_path(&names);
    assert_eq!(app.input, "/send-file docs/report-202");
    type_text(&mut app, "5");
    app.complete_path(&names);
    assert_eq!(app.input, "/send-file docs/report-2025.pdf");
    app.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
    type_text(&mut app, "/send-file s");
    app.complete_path(&names);
    assert_eq!(app.input, "/send-file src/");
    // Elsewhere there is no path to complete.
    app.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
    type_text(&mut app, "hello /send-file ");
    assert_eq!(app.path_being_typed(), None);
}

#[test]
fn the_input_line_edits_pastes_and_turns_commands_into_actions() {
    let mut app = sample();
    assert_eq!(type_text(&mut app, "hi bobb"), None, "typing sends nothing");
    press(&mut app, KeyCode::Backspace);
    press(&mut app, KeyCode::Home);
    press(&mut app, KeyCode::Char('>'));
    app.on_paste("\r\nsecond line");
    assert_eq!(
        press(&mut app, KeyCode::Enter),
        Some(Action::Send {
            group: "friends".into(),
            text: ">\nsecond linehi bob".into(),
        })
    );
    assert!(app.input.is_empty());
    // Alt+Enter starts a new line instead of sending.
    type_text(&mut app, "a");
    assert_eq!(
        app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT)),
        None
    );
    type_text(&mut app, "b");
    assert_eq!(app.input, "a\nb");
    app.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));

    // Completion of commands and names.
    type_text(&mut app, "/inv");
    press(&mut app, KeyCode::Tab);
    type_text(&mut app, "da");
    press(&mut app, KeyCode::Tab);
    assert_eq!(app.input, "/invite dave ");
    assert_eq!(
        press(&mut app, KeyCode::Enter),
        Some(Action::Invite {
            group: "friends".into(),
            user: "dave".into()
        })
    );
    for (line, want) in [
        (
            "/verify bob",
            Some(Action::Verify {
                user: "bob".into(),
                confirm: false,
            }),
        ),
        (
            "/verify bob confirm",
            Some(Action::Verify {
                user: "bob".into(),
                confirm: true,
            }),
        ),
        (
            "/remove dave",
            Some(Action::Remove {
                group: "friends".into(),
                user: "dave".into(),
            }),
        ),
        (
            "/update",
            Some(Action::Update {
                group: "friends".into(),
            }),
        ),
        (
            "/leave",
            Some(Action::Leave {
                group: "friends".into(),
            }),
        ),
        (
            "//slash",
            Some(Action::Send {
                group: "friends".into(),
                text: "/slash".into(),
            }),
        ),
        ("/quit", Some(Action::Quit)),
        ("/bogus", None),
    ] {
        type_text(&mut app, line);
        assert_eq!(press(&mut app, KeyCode::Enter), want, "{line}");
    }
    assert!(app.status.contains("unknown command"), "{}", app.status);
    assert_eq!(
        app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        Some(Action::Quit)
    );
}

// ---- Two real `tui` processes in tmux ------------------------------------

/// A private tmux server, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Self {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "tmux is needed (scripts/bootstrap installs it)");
        Self {
            socket: format!("qnpc-test-{}", std::process::id()),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket, "-f", "/dev/null"]);
        c
    }

    /// Starts `quicnprotochat tui` for `profile` in a 100 × 30 window; when
    /// it exits, the terminal's settings are saved in `PROFILE.stty`.
    fn start_tui(&self, name: &str, profile: &Path) {
        let p = profile.display();
        let line = format!(
            "env QUICNPROTOCHAT_PASSPHRASE=cli-test-passphrase QUICNPROTOCHAT_TOKEN={TEST_TOKEN} TERM=xterm-256color {CLI} --profile {p} tui 2>{p}.err; stty -a >{p}.stty"
        );
        let st = self
            .cmd()
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "100",
                "-y",
                "30",
                &line,
            ])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        let st = self
            .cmd()
            .args(["send-keys", "-t", name])
            .args(keys)
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn screen(&self, name: &str) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to 30 s) until `name`'s screen contains `what`.
    fn wait_for(&self, name: &str, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen(name);
            if s.contains(what) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{name}'s screen never showed {what:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn alive(&self, name: &str) -> bool {
        self.cmd()
            .args(["has-session", "-t", name])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

#[test]
fn two_people_chat_verify_each_other_and_send_a_file_in_the_full_screen_client() {
    let server = TestServer::start().unwrap();
    let (dir, alice, bob) = alice_invited_bob(&server);

    let tmux = Tmux::new();
    tmux.start_tui("alice", &alice);
    tmux.start_tui("bob", &bob);
    tmux.wait_for("alice", ">friends");
    // Bob joins from the Welcome while the screen is up.
    tmux.wait_for("bob", "you joined (added by alice");

    tmux.keys("alice", &["hello bob, this is the full screen", "Enter"]);
    let typed = Instant::now();
    let seen = tmux.wait_for("bob", "alice: hello bob, this is the full screen");
    let latency = typed.elapsed();
    eprintln!("keypress to the other screen: {} ms", latency.as_millis());
    eprintln!("bob's screen:\n{seen}");
    let _ = seen;
    tmux.wait_for("alice", "alice: hello bob, this is the full screen");

    tmux.keys("bob", &["hi alice", "Enter"]);
    tmux.wait_for("alice", "bob: hi alice");

    // Both compute the same safety number.
    tmux.keys("alice", &["/verify bob", "Enter"]);
    tmux.keys("bob", &["/verify alice", "Enter"]);
    let a = tmux.wait_for("alice", "safety number with bob");
    let b = tmux.wait_for("bob", "safety number with alice");
    let digits = |s: &str| -> Vec<String> {
        s.lines()
            .filter_map(|l| {
                let groups: Vec<&str> = l
                    .split_whitespace()
                    .filter(|w| w.len() == 5 && w.bytes().all(|c| c.is_ascii_digit()))
                    .collect();
                (groups.len() == 4).then(|| groups.join(" "))
            })
            .collect()
    };
    let (da, db) = (digits(&a), digits(&b));
    assert_eq!(da.len(), 3, "{a}");
    assert_eq!(da, db, "alice:\n{a}\nbob:\n{b}");
    tmux.keys("alice", &["/verify bob confirm", "Enter"]);
    tmux.wait_for("alice", "bob is verified");
    tmux.wait_for("alice", "* verified");
    let verified = tmux.wait_for("alice", "✓bob");
    eprintln!("alice's screen:\n{verified}");

    // Alice sends a file, its path completed with Tab; it shows on both
    // screens and lands, whole, in bob's download directory.
    let file = dir.path().join("greeting.txt");
    let bytes = b"a file through the full screen\n";
    std::fs::write(&file, bytes).unwrap();
    let typed = format!("/send-file {}/gree", dir.path().display());
    tmux.keys("alice", &[&typed, "Tab", "Enter"]);
    tmux.wait_for("alice", "alice: [file] greeting.txt (31 B, text/plain)");
    let shown = tmux.wait_for("bob", "alice: [file] greeting.txt (31 B, text/plain) saved");
    eprintln!("bob's screen:\n{shown}");
    let saved = bob.join("downloads").join("greeting.txt");
    assert_eq!(std::fs::read(&saved).unwrap(), bytes);

    // /quit ends the process (and tmux's session with it).
    tmux.keys("alice", &["/quit", "Enter"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.alive("alice") {
        assert!(Instant::now() < deadline, "alice's tui did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = std::fs::read_to_string(format!("{}.err", alice.display())).unwrap_or_default();
    assert!(!err.contains("panicked"), "{err}");
    // The terminal is back in cooked mode: line editing and echo on.
    let stty = std::fs::read_to_string(format!("{}.stty", alice.display())).unwrap();
    let flags: Vec<&str> = stty.split_whitespace().collect();
    assert!(
        flags.contains(&"icanon") && flags.contains(&"echo"),
        "raw mode left on: {stty}"
    );
}
