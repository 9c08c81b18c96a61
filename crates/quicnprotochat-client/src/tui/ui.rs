//! Drawing the full-screen client: groups on the left with unread counts,
//! the shown group's messages in the middle, its members with their
//! verification state on the right, the status line and the input below.

use quicnprotochat_core::Verification;
use ratatui::Frame;
use ratatui::layout::{Constraint, Direction, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use super::app::{App, ChatLine, LineKind, Link};

/// Width of the group list and of the member list.
const SIDE: u16 = 18;

/// Draws the whole screen.
pub fn draw(f: &mut Frame<'_>, app: &App) {
    let input_lines = u16::try_from(app.input.split('\n').count().clamp(1, 5)).unwrap_or(1);
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Min(3),
            Constraint::Length(1),
            Constraint::Length(input_lines + 2),
        ])
        .split(f.area());
    let (main, status, input) = (rows[0], rows[1], rows[2]);
    let side = if main.width >= 3 * SIDE { SIDE } else { 0 };
    let cols = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([
            Constraint::Length(side),
            Constraint::Min(10),
            Constraint::Length(side),
        ])
        .split(main);
    if side > 0 {
        draw_groups(f, app, cols[0]);
        draw_members(f, app, cols[2]);
    }
    draw_messages(f, app, cols[1]);
    draw_status(f, app, status);
    draw_input(f, app, input);
}

fn style(app: &App, s: Style) -> Style {
    if app.color { s } else { Style::default() }
}

fn draw_groups(f: &mut Frame<'_>, app: &App, area: Rect) {
    let lines: Vec<Line<'_>> = app
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let unread = if g.unread > 0 {
                format!(" ({})", g.unread)
            } else {
                String::new()
            };
            let marker = if i == app.selected { ">" } else { " " };
            let s = if i == app.selected {
                style(app, Style::default().add_modifier(Modifier::BOLD))
            } else if g.unread > 0 {
                style(app, Style::default().fg(Color::Yellow))
            } else {
                Style::default()
            };
            Line::from(Span::styled(format!("{marker}{}{unread}", g.name), s))
        })
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title("groups")),
        area,
    );
}

fn draw_members(f: &mut Frame<'_>, app: &App, area: Rect) {
    let members = app
        .current()
        .map(|g| g.members.as_slice())
        .unwrap_or_default();
    let lines: Vec<Line<'_>> = members
        .iter()
        .map(|m| {
            let (mark, s) = match m.state {
                None => ("*", Style::default()),
                Some(Verification::Verified) => ("✓", Style::default().fg(Color::Green)),
                Some(Verification::Changed { .. }) => (
                    "!",
                    Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
                ),
                Some(_) => (" ", Style::default()),
            };
            Line::from(Span::styled(format!("{mark}{}", m.username), style(app, s)))
        })
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title("members")),
        area,
    );
}

/// Splits `text` into rows of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut rows = Vec::new();
    for part in text.split('\n') {
        let chars: Vec<char> = part.chars().collect();
        if chars.is_empty() {
            rows.push(String::new());
        }
        for chunk in chars.chunks(width) {
            rows.push(chunk.iter().collect());
        }
    }
    rows
}

/// The rows of one chat line, styled.
fn rows_of<'a>(app: &App, l: &ChatLine, width: usize) -> Vec<Line<'a>> {
    let (prefix, s) = match l.kind {
        LineKind::Message => (
            format!("{} {}: ", l.time, l.sender),
            Style::default().fg(Color::Cyan),
        ),
        LineKind::Own => (
            format!("{} {}: ", l.time, l.sender),
            Style::default().fg(Color::Blue),
        ),
        LineKind::Notice => ("* ".to_string(), Style::default().fg(Color::DarkGray)),
        LineKind::Warning => (
            "! ".to_string(),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
    };
    let indent = prefix.chars().count().min(width / 2);
    let body_width = width.saturating_sub(indent).max(1);
    let mut out = Vec::new();
    for (i, row) in wrap(&l.text, body_width).into_iter().enumerate() {
        let lead = if i == 0 {
            Span::styled(prefix.clone(), style(app, s))
        } else {
            Span::raw(" ".repeat(indent))
        };
        let body = match l.kind {
            LineKind::Warning | LineKind::Notice => Span::styled(row, style(app, s)),
            _ => Span::raw(row),
        };
        out.push(Line::from(vec![lead, body]));
    }
    out
}

fn draw_messages(f: &mut Frame<'_>, app: &App, area: Rect) {
    let title = app
        .current()
        .map(|g| {
            if g.scroll > 0 {
                format!("{} (scrolled back {} lines; PageDown)", g.name, g.scroll)
            } else {
                g.name.clone()
            }
        })
        .unwrap_or_else(|| "no group yet: /invite USER GROUP".into());
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(area);
    let width = usize::from(inner.width);
    let height = usize::from(inner.height);
    let mut rows: Vec<Line<'_>> = Vec::new();
    if let Some(g) = app.current() {
        // Lines from the newest back, until the pane (plus the scroll) is full.
        let skip = g.scroll;
        let mut taken: Vec<Vec<Line<'_>>> = Vec::new();
        let mut count = 0;
        for l in g.lines.iter().rev().skip(skip) {
            let r = rows_of(app, l, width);
            count += r.len();
            taken.push(r);
            if count >= height {
                break;
            }
        }
        for r in taken.into_iter().rev() {
            rows.extend(r);
        }
        let extra = rows.len().saturating_sub(height);
        rows.drain(..extra);
    }
    f.render_widget(Paragraph::new(rows).block(block), area);
}

fn draw_status(f: &mut Frame<'_>, app: &App, area: Rect) {
    let (text, s) = match &app.link {
        Link::Online => (
            format!("{} | {}", app.me, app.status),
            Style::default().add_modifier(Modifier::REVERSED),
        ),
        Link::Offline(why) => (
            format!(
                "OFFLINE, reconnecting{} | {why} | {}",
                if app.unsent.is_empty() {
                    String::new()
                } else {
                    format!("; {} unsent", app.unsent.len())
                },
                app.status
            ),
            Style::default().fg(Color::White).bg(Color::Red),
        ),
    };
    let s = if app.color {
        s
    } else {
        Style::default().add_modifier(Modifier::REVERSED)
    };
    f.render_widget(Paragraph::new(Line::from(Span::styled(text, s))), area);
}

fn draw_input(f: &mut Frame<'_>, app: &App, area: Rect) {
    let block = Block::default().borders(Borders::ALL).title("message");
    let inner = block.inner(area);
    let lines: Vec<&str> = app.input.split('\n').collect();
    let shown = usize::from(inner.height).max(1);
    let first = lines.len().saturating_sub(shown);
    let text: Vec<Line<'_>> = lines[first..].iter().map(|l| Line::raw(*l)).collect();
    // The cursor: its row and column within the shown lines.
    let before = &app.input[..app.cursor];
    let row = before.matches('\n').count().saturating_sub(first);
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count());
    let hscroll = col.saturating_sub(usize::from(inner.width).saturating_sub(1));
    f.render_widget(
        Paragraph::new(text)
            .block(block)
            .scroll((0, u16::try_from(hscroll).unwrap_or(0))),
        area,
    );
    let x = inner.x + u16::try_from(col - hscroll).unwrap_or(0);
    let y = inner.y + u16::try_from(row).unwrap_or(0);
    f.set_cursor_position(Position::new(x, y));
}
