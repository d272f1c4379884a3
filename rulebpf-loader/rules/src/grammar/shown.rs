//! The user's text inside error messages. Messages go to terminals and logs,
//! so what the file holds must not act there: control characters (a NUL, an
//! ESC starting a terminal sequence, a carriage return rewriting the line)
//! and invisible ones (a byte-order mark, a zero-width space, a bidi
//! override) are written escaped, the way Rust writes them (`\0`, `\u{1b}`,
//! `\u{feff}`). A word echoed back is cut short, so that one bad 1 MB word
//! does not become a 1 MB message.

use std::borrow::Cow;

/// Characters of a word echoed in a message; longer ones end in `…`.
const ECHO_CHARS: usize = 40;

/// `message` with every control or invisible character escaped. Applied to
/// every message the grammar produces ([`super::LineError::new`]).
pub(super) fn escaped(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for c in message.chars() {
        // `escape_debug` leaves printable characters alone and escapes the
        // rest; quotes and backslashes it escapes for Rust literals, which a
        // message is not.
        if matches!(c, '"' | '\'' | '\\') {
            out.push(c);
        } else {
            out.extend(c.escape_debug());
        }
    }
    out
}

/// `word` as echoed in a message: its first [`ECHO_CHARS`] characters, then
/// `…` when there were more.
pub(super) fn cut(word: &str) -> Cow<'_, str> {
    match word.char_indices().nth(ECHO_CHARS) {
        None => Cow::Borrowed(word),
        Some((end, _)) => Cow::Owned(format!("{}…", &word[..end])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(
            escaped("a\0b\u{1b}[2Jc\u{feff}d\r\u{202e}"),
            r"a\0b\u{1b}[2Jc\u{feff}d\r\u{202e}"
        );
        // What a message says itself stays as it is.
        let plain = r#"0 alone means "let the OS choose" (`a\b`, é, ü, 漢)"#;
        assert_eq!(escaped(plain), plain);
    }

    #[test]
    fn long_words_are_cut() {
        assert_eq!(cut("short"), "short");
        let long = "é".repeat(100);
        assert_eq!(cut(&long), format!("{}…", "é".repeat(ECHO_CHARS)));
    }
}
