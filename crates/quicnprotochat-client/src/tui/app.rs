//! The full-screen client's state and everything a key, a paste, a mouse
//! wheel or a messenger event does to it.  No IO: the event loop
//! (`tui/mod.rs`) carries out the [`Action`]s this returns, and the tests
//! drive it directly.

use std::collections::BTreeSet;

use quicnprotochat_core::{Event, StoredMessage, Verification};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// Most lines kept per group on screen (older ones stay in `history`).
pub const MAX_LINES: usize = 2_000;

/// The commands of the input line, for help and completion.
pub const COMMANDS: &[&str] = &[
    "/invite",
    "/remove",
    "/leave",
    "/update",
    "/verify",
    "/send-file",
    "/group",
    "/quit",
];

/// What the event loop should do for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// send a text to a group
    Send {
        /// group
        group: String,
        /// text
        text: String,
    },
    /// send a file to a group
    SendFile {
        /// group
        group: String,
        /// the file's path, as typed
        path: String,
    },
    /// invite a user to a group (creating it when new)
    Invite {
        /// group
        group: String,
        /// user
        user: String,
    },
    /// remove a user from a group
    Remove {
        /// group
        group: String,
        /// user
        user: String,
    },
    /// leave a group
    Leave {
        /// group
        group: String,
    },
    /// refresh our keys in a group
    Update {
        /// group
        group: String,
    },
    /// show the safety number with a user; `confirm`: mark them verified
    Verify {
        /// user
        user: String,
        /// mark verified
        confirm: bool,
    },
    /// leave the client
    Quit,
}

/// How a line in the message pane looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// a message from a member
    Message,
    /// our own message
    Own,
    /// something that happened (joins, removals, key updates)
    Notice,
    /// a warning the user must see
    Warning,
}

/// A line of the message pane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatLine {
    /// "HH:MM" (UTC), empty for notices
    pub time: String,
    /// sender, empty for notices
    pub sender: String,
    /// the text (may hold newlines)
    pub text: String,
    /// how it looks
    pub kind: LineKind,
}

/// A member as the member pane shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberLine {
    /// username
    pub username: String,
    /// verification state (`None`: this is us)
    pub state: Option<Verification>,
}

/// A group with its lines.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    /// local name
    pub name: String,
    /// lines, oldest first
    pub lines: Vec<ChatLine>,
    /// messages arrived while another group was shown
    pub unread: usize,
    /// members with their verification state
    pub members: Vec<MemberLine>,
    /// lines scrolled up from the bottom
    pub scroll: usize,
}

/// The connection as the status line shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// connected
    Online,
    /// lost; the client reconnects by itself
    Offline(String),
}

/// The whole screen's state.
#[derive(Debug, Clone)]
pub struct App {
    /// our username
    pub me: String,
    /// groups, in the order shown
    pub groups: Vec<GroupView>,
    /// index of the shown group
    pub selected: usize,
    /// the input line
    pub input: String,
    /// cursor position in `input` (a char boundary)
    pub cursor: usize,
    /// the status line's text
    pub status: String,
    /// the connection
    pub link: Link,
    /// colours on (off with `NO_COLOR`)
    pub color: bool,
    /// lines typed while offline, sent in order once back
    pub unsent: Vec<(String, String)>,
    /// users named anywhere (for completion)
    pub users: BTreeSet<String>,
}

impl App {
    /// An empty screen for `me`.
    pub fn new(me: &str, color: bool) -> Self {
        Self {
            me: me.to_string(),
            groups: Vec::new(),
            selected: 0,
            input: String::new(),
            cursor: 0,
            status: "Enter sends; Alt+Enter: new line; /invite USER, /verify USER, /send-file PATH, /quit; Ctrl+N/Ctrl+P: next/previous group".into(),
            link: Link::Online,
            color,
            unsent: Vec::new(),
            users: BTreeSet::new(),
        }
    }

    /// The shown group.
    pub fn current(&self) -> Option<&GroupView> {
        self.groups.get(self.selected)
    }

    fn current_name(&self) -> Option<String> {
        self.current().map(|g| g.name.clone())
    }

    /// The group named `name`, added when new.
    pub fn group_mut(&mut self, name: &str) -> &mut GroupView {
        let idx = match self.groups.iter().position(|g| g.name == name) {
            Some(i) => i,
            None => {
                self.groups.push(GroupView {
                    name: name.to_string(),
                    ..GroupView::default()
                });
                self.groups.len() - 1
            }
        };
        &mut self.groups[idx]
    }

    /// Shows `name`'s group (clearing its unread count).
    pub fn select(&mut self, name: &str) {
        if let Some(i) = self.groups.iter().position(|g| g.name == name) {
            self.selected = i;
            self.groups[i].unread = 0;
        }
    }

    /// Replaces `group`'s members.
    pub fn set_members(&mut self, group: &str, members: Vec<MemberLine>) {
        for m in &members {
            self.users.insert(m.username.clone());
        }
        self.group_mut(group).members = members;
    }

    /// Appends a line to `group`; counts it unread when another group is
    /// shown and it is a message.
    pub fn push_line(&mut self, group: &str, line: ChatLine) {
        let shown = self.current_name().as_deref() == Some(group);
        let g = self.group_mut(group);
        if !shown && line.kind == LineKind::Message {
            g.unread += 1;
        }
        if g.scroll > 0 {
            g.scroll += 1; // keep the view where the reader left it
        }
        g.lines.push(line);
        if g.lines.len() > MAX_LINES {
            let extra = g.lines.len() - MAX_LINES;
            g.lines.drain(..extra);
        }
    }

    /// A stored message as a line.
    pub fn message_line(&self, m: &StoredMessage) -> ChatLine {
        ChatLine {
            time: hhmm(m.sent_at_ms),
            sender: m.sender.clone(),
            text: m.text.clone(),
            kind: if m.sender == self.me {
                LineKind::Own
            } else {
                LineKind::Message
            },
        }
    }

    /// Updates the screen for a messenger event.  Returns the group whose
    /// members changed, so the loop can reload them.
    pub fn on_event(&mut self, e: &Event) -> Option<String> {
        let notice = |text: String| ChatLine {
            time: String::new(),
            sender: String::new(),
            text,
            kind: LineKind::Notice,
        };
        match e {
            Event::Message(m) => {
                self.users.insert(m.sender.clone());
                let line = self.message_line(m);
                self.push_line(&m.group, line);
                None
            }
            Event::Joined { group, by, members } => {
                let text = format!(
                    "you joined (added by {by}; members: {})",
                    members.join(", ")
                );
                self.push_line(group, notice(text));
                if self.groups.len() == 1 {
                    self.select(group);
                }
                Some(group.clone())
            }
            Event::MembersAdded { group, by, members } => {
                self.push_line(group, notice(format!("{by} added {}", members.join(", "))));
                Some(group.clone())
            }
            Event::MembersRemoved { group, by, members } => {
                self.push_line(
                    group,
                    notice(format!("{by} removed {}", members.join(", "))),
                );
                Some(group.clone())
            }
            Event::Removed { group, by } => {
                self.push_line(group, notice(format!("{by} removed you from this group")));
                Some(group.clone())
            }
            Event::KeyUpdated { group, by } => {
                self.push_line(group, notice(format!("{by} updated their keys")));
                None
            }
            Event::DirectoryMismatch { group, member, key } => {
                let text = format!(
                    "WARNING: a member calls itself {member} but its key {key} is not {member}'s key on the server"
                );
                self.warn(group, text);
                Some(group.clone())
            }
            Event::VerifiedKeyChanged {
                group,
                member,
                key,
                verified,
            } => {
                let text = format!(
                    "WARNING: {member} now has the identity key {key}, not the key {verified} you verified; someone may be impersonating {member}. Compare safety numbers again: /verify {member}"
                );
                self.warn(group, text);
                Some(group.clone())
            }
            Event::Undecryptable {
                group: Some(group),
                kept,
                ..
            } => {
                let fate = if *kept {
                    "kept to retry when its epoch arrives"
                } else {
                    "dropped"
                };
                self.warn(group, format!("a message could not be decrypted; {fate}"));
                None
            }
            Event::Disconnected { reason } => {
                self.link = Link::Offline(reason.clone());
                None
            }
            Event::Reconnected => {
                self.link = Link::Online;
                None
            }
            _ => None,
        }
    }

    /// Puts a warning in `group` and on the status line.
    pub fn warn(&mut self, group: &str, text: String) {
        self.status = text.clone();
        self.push_line(
            group,
            ChatLine {
                time: String::new(),
                sender: String::new(),
                text,
                kind: LineKind::Warning,
            },
        );
    }

    /// Puts a notice in the shown group.
    pub fn notice(&mut self, text: String) {
        if let Some(g) = self.current_name() {
            self.push_line(
                &g,
                ChatLine {
                    time: String::new(),
                    sender: String::new(),
                    text,
                    kind: LineKind::Notice,
                },
            );
        } else {
            self.status = text;
        }
    }

    /// Inserts pasted text at the cursor (newlines kept).
    pub fn on_paste(&mut self, text: &str) {
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        self.input.insert_str(self.cursor, &text);
        self.cursor += text.len();
    }

    /// Scrolls the shown group by `lines` (positive: back in time).
    pub fn scroll(&mut self, lines: isize) {
        if let Some(g) = self.groups.get_mut(self.selected) {
            let max = g.lines.len();
            g.scroll = g.scroll.saturating_add_signed(lines).min(max);
        }
    }

    /// Handles a key; returns what the loop should do.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Action> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        match key.code {
            KeyCode::Char('c') | KeyCode::Char('d') if ctrl => return Some(Action::Quit),
            KeyCode::Char('n') if ctrl => self.cycle(1),
            KeyCode::Char('p') if ctrl => self.cycle(-1),
            KeyCode::Char('u') if ctrl => {
                self.input.clear();
                self.cursor = 0;
            }
            KeyCode::Enter if alt || key.modifiers.contains(KeyModifiers::SHIFT) => {
                self.on_paste("\n");
            }
            KeyCode::Enter => return self.submit(),
            KeyCode::Char(c) => {
                self.input.insert(self.cursor, c);
                self.cursor += c.len_utf8();
            }
            KeyCode::Backspace => {
                if let Some(c) = self.input[..self.cursor].chars().next_back() {
                    self.cursor -= c.len_utf8();
                    self.input.remove(self.cursor);
                }
            }
            KeyCode::Delete if self.cursor < self.input.len() => {
                self.input.remove(self.cursor);
            }
            KeyCode::Left => {
                if let Some(c) = self.input[..self.cursor].chars().next_back() {
                    self.cursor -= c.len_utf8();
                }
            }
            KeyCode::Right => {
                if let Some(c) = self.input[self.cursor..].chars().next() {
                    self.cursor += c.len_utf8();
                }
            }
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = self.input.len(),
            KeyCode::PageUp => self.scroll(10),
            KeyCode::PageDown => self.scroll(-10),
            KeyCode::Tab => self.complete(),
            _ => {}
        }
        None
    }

    fn cycle(&mut self, by: isize) {
        let n = self.groups.len();
        if n == 0 {
            return;
        }
        let next = (self.selected as isize + by).rem_euclid(n as isize);
        self.selected = usize::try_from(next).unwrap_or(0);
        if let Some(g) = self.groups.get_mut(self.selected) {
            g.unread = 0;
        }
    }

    /// Completes the word before the cursor: a command at the start of the
    /// line, a group after `/group`, else a user name.
    pub fn complete(&mut self) {
        let before = &self.input[..self.cursor];
        let start = before.rfind(' ').map_or(0, |i| i + 1);
        let word = &before[start..];
        if word.is_empty() {
            return;
        }
        let candidates: Vec<String> = if start == 0 && word.starts_with('/') {
            COMMANDS.iter().map(|c| c.to_string()).collect()
        } else if before.starts_with("/group ") {
            self.groups.iter().map(|g| g.name.clone()).collect()
        } else {
            self.users
                .iter()
                .filter(|u| **u != self.me)
                .cloned()
                .collect()
        };
        let matches: Vec<&String> = candidates.iter().filter(|c| c.starts_with(word)).collect();
        match matches.as_slice() {
            [one] => {
                let rest = format!("{} ", &one[word.len()..]);
                self.input.insert_str(self.cursor, &rest);
                self.cursor += rest.len();
            }
            [] => {}
            many => {
                self.status = many
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("  ");
            }
        }
    }

    /// The path typed after `/send-file`, up to the cursor, when the input
    /// is that command: what Tab completes from the file system.
    pub fn path_being_typed(&self) -> Option<&str> {
        self.input[..self.cursor]
            .strip_prefix("/send-file ")
            .map(str::trim_start)
    }

    /// Completes the path being typed from `names`, the entries of its
    /// directory (directories ending in `/`): one match is inserted whole;
    /// several extend the path as far as they agree and are listed on the
    /// status line.
    pub fn complete_path(&mut self, names: &[String]) {
        let Some(typed) = self.path_being_typed() else {
            return;
        };
        let last = typed.rsplit('/').next().unwrap_or(typed);
        let matches: Vec<&String> = names.iter().filter(|n| n.starts_with(last)).collect();
        let Some(first) = matches.first() else {
            return;
        };
        // The longest prefix every match shares.
        let mut common = first.as_str();
        for m in &matches[1..] {
            let shared = common
                .char_indices()
                .zip(m.chars())
                .find(|((_, a), b)| a != b)
                .map_or(common.len().min(m.len()), |((i, _), _)| i);
            common = &common[..shared];
        }
        let rest = common[last.len().min(common.len())..].to_string();
        if matches.len() > 1 {
            self.status = matches
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("  ");
        }
        self.input.insert_str(self.cursor, &rest);
        self.cursor += rest.len();
    }

    /// The input line as an action (a text to send or a command).
    pub fn submit(&mut self) -> Option<Action> {
        let line = std::mem::take(&mut self.input);
        self.cursor = 0;
        let text = line.trim_end();
        if text.trim().is_empty() {
            return None;
        }
        if !text.starts_with('/') || text.starts_with("//") {
            let body = text.strip_prefix('/').filter(|_| text.starts_with("//"));
            let Some(group) = self.current_name() else {
                self.status = "no group yet: /invite USER GROUP creates one".into();
                self.input = line;
                self.cursor = self.input.len();
                return None;
            };
            return Some(Action::Send {
                group,
                text: body.unwrap_or(text).to_string(),
            });
        }
        // The path is the rest of the line: it may hold spaces.
        if let Some(path) = text.strip_prefix("/send-file ") {
            let path = path.trim();
            if !path.is_empty() {
                let group = self.current_name();
                if group.is_none() {
                    self.status = "no group shown".into();
                }
                return group.map(|group| Action::SendFile {
                    group,
                    path: path.to_string(),
                });
            }
        }
        let mut words = text.split_whitespace();
        let cmd = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        let group = self.current_name();
        let need_group = |g: Option<String>, app: &mut Self| {
            if g.is_none() {
                app.status = "no group shown".into();
            }
            g
        };
        match (cmd, args.as_slice()) {
            ("/quit", []) => Some(Action::Quit),
            ("/invite", [user]) => need_group(group, self).map(|group| Action::Invite {
                group,
                user: user.to_string(),
            }),
            ("/invite", [user, group]) => Some(Action::Invite {
                group: group.to_string(),
                user: user.to_string(),
            }),
            ("/remove", [user]) => need_group(group, self).map(|group| Action::Remove {
                group,
                user: user.to_string(),
            }),
            ("/leave", []) => need_group(group, self).map(|group| Action::Leave { group }),
            ("/update", []) => need_group(group, self).map(|group| Action::Update { group }),
            ("/verify", [user]) => Some(Action::Verify {
                user: user.to_string(),
                confirm: false,
            }),
            ("/verify", [user, "confirm"]) => Some(Action::Verify {
                user: user.to_string(),
                confirm: true,
            }),
            ("/group", [name]) => {
                if self.groups.iter().any(|g| g.name == *name) {
                    self.select(name);
                } else {
                    self.status = format!("no group {name}; /invite USER {name} creates it");
                }
                None
            }
            _ => {
                self.status = format!(
                    "unknown command or arguments: {text}  (commands: /invite USER [GROUP], /remove USER, /leave, /update, /verify USER [confirm], /send-file PATH, /group NAME, /quit; // starts a message with /)"
                );
                None
            }
        }
    }
}

/// "HH:MM" in UTC of a Unix time in milliseconds.
pub fn hhmm(ms: u64) -> String {
    let mins = (ms / 60_000) % (24 * 60);
    format!("{:02}:{:02}", mins / 60, mins % 60)
}
