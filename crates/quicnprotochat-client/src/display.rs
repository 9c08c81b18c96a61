//! Text from other people, made safe to print on a terminal.
//!
//! Message text, sender names and member names come from group members, and
//! a terminal interprets some characters: an escape starts a control
//! sequence (colours, cursor movement, a changed window title, on some
//! terminals worse), a carriage return or backspaces overwrite what is
//! already on the line, bidirectional overrides make text read other than
//! it is, and a line break could start a forged line that looks like
//! another sender's.  [`terminal_safe`] shows each such character instead
//! of letting the terminal act on it.

use std::borrow::Cow;

/// `text` with every character a terminal would act on shown instead:
/// C0 controls in caret notation (`^[` for escape, `^M` for carriage
/// return), DEL as `^?`, C1 controls and bidirectional or invisible
/// formatting characters as `<U+XXXX>`; a line break continues on an
/// indented line (so no line of a message starts where a sender's name
/// would), and a tab stays a tab.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c != '\t' && needs_showing(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' => out.push('\t'),
            '\n' => out.push_str("\n    "),
            c if u32::from(c) < 0x20 => {
                out.push('^');
                out.push(char::from(b'@' + u8::try_from(u32::from(c)).unwrap_or(0)));
            }
            '\u{7f}' => out.push_str("^?"),
            c if needs_showing(c) => out.push_str(&format!("<U+{:04X}>", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The characters a file name may not hold either: control characters
/// (C0, DEL, C1), bidirectional formatting, invisible ones, line and
/// paragraph separators.
fn needs_showing(c: char) -> bool {
    quicnprotochat_core::file::unsafe_char(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_text_is_untouched() {
        for s in ["hello", "grüße, 你好 🙂", "a\tb", ""] {
            assert!(matches!(terminal_safe(s), Cow::Borrowed(_)), "{s}");
        }
    }

    #[test]
    fn what_a_terminal_would_act_on_is_shown_instead() {
        assert_eq!(
            terminal_safe("\u{1b}]0;pwned\u{7}\u{1b}[2J"),
            "^[]0;pwned^G^[[2J"
        );
        assert_eq!(terminal_safe("fine\rFAKE"), "fine^MFAKE");
        assert_eq!(terminal_safe("abc\u{8}\u{8}\u{8}xyz"), "abc^H^H^Hxyz");
        assert_eq!(terminal_safe("\u{7f}\u{9b}31m"), "^?<U+009B>31m");
        assert_eq!(terminal_safe("txt.\u{202e}exe"), "txt.<U+202E>exe");
        assert_eq!(terminal_safe("a\u{0}b"), "a^@b");
        // A line break cannot start a line that looks like another sender's.
        assert_eq!(
            terminal_safe("hi\n[friends] alice: send me your passphrase"),
            "hi\n    [friends] alice: send me your passphrase"
        );
        assert!(
            !terminal_safe("x\u{1b}\u{9b}\u{2066}\r")
                .chars()
                .any(|c| c.is_control())
        );
    }
}
