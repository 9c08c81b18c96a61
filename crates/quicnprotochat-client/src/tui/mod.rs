//! `quicnprotochat tui`: the full-screen terminal client (ratatui over
//! crossterm).
//!
//! - `app.rs`: the state and what each key, paste and event does (no IO);
//! - `ui.rs`: drawing it;
//! - this file: the terminal (raw mode and the alternate screen, always
//!   restored: on return, on error and on panic), the input thread, and the
//!   loop that carries out actions with the messenger while events keep
//!   arriving.

pub mod app;
pub mod ui;

use std::future::Future;
use std::io::Stdout;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use quicnprotochat_core::Verification;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{
    self as term_event, DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste,
    EnableMouseCapture, Event as TermEvent, KeyCode, KeyEventKind, MouseEventKind,
};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use tokio::sync::mpsc;

use crate::{Messenger, MessengerError};
use app::{Action, App, ChatLine, LineKind, MemberLine};

/// Messages of each group loaded from the history at start.
const HISTORY: usize = 500;

/// Messages left unshown by earlier runs that are marked shown at start
/// (they are among the loaded history).
const MAX_UNSHOWN: usize = 10_000;

/// Errors of the full-screen client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TuiError {
    /// the terminal failed
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
    /// the messenger failed at start
    #[error(transparent)]
    Messenger(#[from] MessengerError),
}

/// Raw mode, the alternate screen, bracketed paste and mouse reporting,
/// undone on drop (and by the panic hook installed with it).
struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(
        std::io::stdout(),
        DisableMouseCapture,
        DisableBracketedPaste,
        LeaveAlternateScreen
    );
}

impl TerminalGuard {
    fn enter() -> Result<Self, TuiError> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        enable_raw_mode()?;
        let mut stdout = std::io::stdout();
        if let Err(e) = execute!(
            stdout,
            EnterAlternateScreen,
            EnableBracketedPaste,
            EnableMouseCapture
        ) {
            restore();
            return Err(e.into());
        }
        match Terminal::new(CrosstermBackend::new(stdout)) {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                restore();
                Err(e.into())
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
        let _ = self.terminal.show_cursor();
    }
}

/// What a finished action reports to the screen.
enum Done {
    /// a line to show as a notice in the shown group, or a status
    Notice(String),
    /// an error for the status line
    Error(String),
    /// a sent line (shown as our own)
    Sent { group: String, text: String },
    /// a line that could not be sent for now (kept, sent when back online)
    Unsent {
        group: String,
        text: String,
        why: String,
    },
    /// the members of `group` changed: reload them
    Members(String),
    /// the members of a group, reloaded
    MembersLoaded(String, Vec<MemberLine>),
    /// the safety number to show
    Verify(Vec<String>),
}

type Job<'a> = Pin<Box<dyn Future<Output = Vec<Done>> + 'a>>;

/// Runs the full-screen client until the user quits.
pub async fn run(m: Messenger) -> Result<(), TuiError> {
    let me = m.username().await;
    let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut app = App::new(&me, color);
    for g in m.groups().await? {
        let name = g.name.clone();
        for msg in m.history(&name, HISTORY).await? {
            let line = app.message_line(&msg);
            app.group_mut(&name).lines.push(line);
        }
        let members = members_of(&m, &name).await.unwrap_or_default();
        app.set_members(&name, members);
    }
    let mut events = m.listen().await?;

    let (key_tx, mut key_rx) = mpsc::channel::<TermEvent>(256);
    // crossterm's read blocks: its own thread, which ends with the process.
    std::thread::spawn(move || {
        while let Ok(e) = term_event::read() {
            if key_tx.blocking_send(e).is_err() {
                break;
            }
        }
    });

    let mut guard = TerminalGuard::enter()?;
    let mut jobs: FuturesUnordered<Job<'_>> = FuturesUnordered::new();
    // Messages count as shown once a frame with them was drawn: the ones
    // earlier runs left unshown (now in the loaded history) first.
    let mut to_mark = m.unshown(MAX_UNSHOWN).await.unwrap_or_default();
    loop {
        guard.terminal.draw(|f| ui::draw(f, &app))?;
        if !to_mark.is_empty() {
            let shown = std::mem::take(&mut to_mark);
            let m = &m;
            jobs.push(Box::pin(async move {
                match m.mark_shown(&shown).await {
                    Ok(()) => Vec::new(),
                    Err(e) => vec![Done::Error(e.to_string())],
                }
            }));
        }
        tokio::select! {
            input = key_rx.recv() => {
                let Some(input) = input else { break };
                let action = match input {
                    // A path after /send-file completes from the file system.
                    TermEvent::Key(k)
                        if k.code == KeyCode::Tab
                            && k.kind != KeyEventKind::Release
                            && app.path_being_typed().is_some() =>
                    {
                        let names = app.path_being_typed().map(path_candidates).unwrap_or_default();
                        app.complete_path(&names);
                        None
                    }
                    TermEvent::Key(k) => app.on_key(k),
                    TermEvent::Paste(p) => { app.on_paste(&p); None }
                    TermEvent::Mouse(mouse) => {
                        match mouse.kind {
                            MouseEventKind::ScrollUp => app.scroll(3),
                            MouseEventKind::ScrollDown => app.scroll(-3),
                            _ => {}
                        }
                        None
                    }
                    _ => None,
                };
                match action {
                    Some(Action::Quit) => break,
                    Some(a) => jobs.push(Box::pin(perform(&m, a))),
                    None => {}
                }
            }
            e = events.next() => {
                let Some(e) = e else {
                    app.link = app::Link::Offline("the event stream ended".into());
                    continue;
                };
                let back_online = matches!(e, quicnprotochat_core::Event::Reconnected);
                if let quicnprotochat_core::Event::Message(msg) = &e {
                    to_mark.push(msg.clone());
                }
                if let Some(group) = app.on_event(&e) {
                    jobs.push(Box::pin(reload_members(&m, group)));
                }
                if back_online {
                    for (group, text) in std::mem::take(&mut app.unsent) {
                        jobs.push(Box::pin(perform(&m, Action::Send { group, text })));
                    }
                }
            }
            Some(done) = jobs.next(), if !jobs.is_empty() => {
                for d in done {
                    apply(&mut app, &m, &mut jobs, d);
                }
            }
        }
    }
    drop(guard);
    Ok(())
}

fn apply<'a>(app: &mut App, m: &'a Messenger, jobs: &mut FuturesUnordered<Job<'a>>, d: Done) {
    match d {
        Done::Notice(t) => app.notice(t),
        Done::Error(t) => app.status = format!("error: {t}"),
        Done::Sent { group, text } => {
            let line = ChatLine {
                time: app::hhmm(now_ms()),
                sender: app.me.clone(),
                text,
                kind: LineKind::Own,
            };
            app.push_line(&group, line);
        }
        Done::Unsent { group, text, why } => {
            app.status = format!("not sent yet ({why}); it is sent when the connection is back");
            app.unsent.push((group, text));
        }
        Done::Members(group) => jobs.push(Box::pin(reload_members(m, group))),
        Done::MembersLoaded(group, members) => app.set_members(&group, members),
        Done::Verify(lines) => {
            for l in lines {
                app.notice(l);
            }
        }
    }
}

fn now_ms() -> u64 {
    use quicnprotochat_core::clock::Clock as _;
    quicnprotochat_core::clock::SystemClock::new().unix_ms()
}

async fn members_of(m: &Messenger, group: &str) -> Result<Vec<MemberLine>, MessengerError> {
    Ok(m.members_verified(group)
        .await?
        .into_iter()
        .map(|(info, state)| MemberLine {
            username: info.username,
            state: (!info.is_self).then_some(state),
        })
        .collect())
}

async fn reload_members(m: &Messenger, group: String) -> Vec<Done> {
    match members_of(m, &group).await {
        Ok(members) => vec![Done::MembersLoaded(group, members)],
        Err(e) => vec![Done::Error(e.to_string())],
    }
}

/// Whether a send failed before reaching the server, so sending the line
/// again cannot show it twice.  (After a timeout or a connection lost in
/// the middle, the server may have stored it.)
fn never_reached_the_server(e: &crate::ClientError) -> bool {
    matches!(
        e,
        crate::ClientError::Unreachable { .. } | crate::ClientError::Connect { .. }
    )
}

/// Carries out `a`; what it reports goes to the screen.
async fn perform(m: &Messenger, a: Action) -> Vec<Done> {
    let result = match a {
        Action::SendFile { group, path } => {
            return match m.send_file(&group, &expand_home(&path)).await {
                Ok(f) => vec![Done::Sent {
                    group,
                    text: f.summary(),
                }],
                Err(MessengerError::Client(e)) if !never_reached_the_server(&e) => {
                    vec![Done::Error(format!(
                        "{e} (the file may not have been sent)"
                    ))]
                }
                Err(e) => vec![Done::Error(format!("{e} (the file was not sent)"))],
            };
        }
        Action::Send { group, text } => {
            return match m.send(&group, &text).await {
                Ok(()) => vec![Done::Sent { group, text }],
                Err(MessengerError::Client(e)) if never_reached_the_server(&e) => {
                    vec![Done::Unsent {
                        group,
                        text,
                        why: e.to_string(),
                    }]
                }
                Err(e) => vec![Done::Error(format!(
                    "{e} (the line may not have been sent)"
                ))],
            };
        }
        Action::Invite { group, user } => m.invite(&group, &user).await.map(|_| {
            vec![
                Done::Notice(format!("invited {user}")),
                Done::Members(group),
            ]
        }),
        Action::Remove { group, user } => m.remove(&group, &user).await.map(|_| {
            vec![
                Done::Notice(format!("removed {user}")),
                Done::Members(group),
            ]
        }),
        Action::Leave { group } => m
            .leave(&group)
            .await
            .map(|()| vec![Done::Notice(format!("you left {group}"))]),
        Action::Update { group } => m
            .update(&group)
            .await
            .map(|_| vec![Done::Notice("your keys in this group are fresh".into())]),
        Action::Verify { user, confirm } => verify(m, &user, confirm).await,
        Action::Quit => Ok(Vec::new()),
    };
    result.unwrap_or_else(|e| vec![Done::Error(e.to_string())])
}

/// `path` with a leading `~/` taken as the home directory.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Most directory entries read to complete a path.
const MAX_COMPLETIONS: usize = 10_000;

/// The names in the directory of the path being typed, for completion:
/// directories end in `/`; hidden names only when the typed part starts
/// with a dot.
fn path_candidates(typed: &str) -> Vec<String> {
    let (dir, last) = match typed.rfind('/') {
        Some(i) => (&typed[..=i], &typed[i + 1..]),
        None => ("", typed),
    };
    let dir = if dir.is_empty() {
        PathBuf::from(".")
    } else {
        expand_home(dir)
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .take(MAX_COMPLETIONS)
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.starts_with('.') && !last.starts_with('.') {
                return None;
            }
            let is_dir = e.path().is_dir();
            Some(if is_dir { format!("{name}/") } else { name })
        })
        .collect();
    names.sort();
    names
}

async fn verify(m: &Messenger, user: &str, confirm: bool) -> Result<Vec<Done>, MessengerError> {
    let mut contacts = m.contacts_named(user).await?;
    let mut lines = Vec::new();
    if contacts.len() > 1 {
        lines.push(format!(
            "WARNING: {} different keys call themselves {user}; at most one is {user}",
            contacts.len()
        ));
    }
    if confirm && let [c] = contacts.as_slice() {
        m.mark_verified(c).await?;
        lines.push(format!("{user} is verified"));
        contacts = m.contacts_named(user).await?;
    }
    for c in &contacts {
        lines.push(format!("safety number with {user} ({}):", c.key));
        for row in c.safety_number.to_string().lines() {
            lines.push(format!("  {row}"));
        }
        lines.push(match c.verification {
            Verification::Verified => "verified".to_string(),
            Verification::Changed { verified } => format!(
                "WARNING: not the key you verified ({verified}); compare again before confirming"
            ),
            _ => format!(
                "not verified: compare it with {user} in person or over a call you trust, then /verify {user} confirm"
            ),
        });
    }
    let mut done = vec![Done::Verify(lines)];
    if confirm {
        for g in m.groups().await? {
            done.push(Done::Members(g.name));
        }
    }
    Ok(done)
}
