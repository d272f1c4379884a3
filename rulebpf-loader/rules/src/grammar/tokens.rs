//! A rule line as words and `:` separators, each with its column, so every
//! error can point at the character it is about.
//!
//! Columns count characters, not bytes, so they cost a scan of the text
//! before them. Every column is carried forward from the previous one
//! ([`Token::split`], [`pieces`]) or computed once per word ([`Token::col_at`]
//! on a word already split short), never by rescanning a line from its start
//! for each part: parsing stays linear in the length of a line (a 1 MB port
//! list once took seconds per column, quadratically). [`width`] is the one
//! place that counts.

#[cfg(test)]
thread_local! {
    /// Bytes [`width`] has scanned on this thread: the linearity test's meter.
    pub(super) static SCANNED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The number of characters in `text`: the columns it spans.
pub(super) fn width(text: &str) -> u32 {
    #[cfg(test)]
    SCANNED.with(|scanned| scanned.set(scanned.get() + text.len()));
    u32::try_from(text.chars().count()).unwrap_or(u32::MAX)
}

/// A run of characters that is neither whitespace nor `:`, with its column.
#[derive(Clone, Copy)]
pub(super) struct Token<'a> {
    pub(super) text: &'a str,
    /// 1-based column of its first character.
    pub(super) col: u32,
}

impl<'a> Token<'a> {
    /// Column of the character at byte offset `byte` inside the token: a
    /// scan of the token up to there, so once per token (or per part of a
    /// [`Token::split`]), not once per part of a long token.
    pub(super) fn col_at(&self, byte: usize) -> u32 {
        self.col.saturating_add(width(&self.text[..byte]))
    }

    /// The parts of the token between `separator`s, each with its column,
    /// carried from part to part: linear in the token's length.
    pub(super) fn split(self, separator: char) -> impl Iterator<Item = Token<'a>> {
        let mut col = self.col;
        self.text.split(separator).map(move |text| {
            let part = Token { text, col };
            col = col.saturating_add(width(text)).saturating_add(1);
            part
        })
    }
}

/// The line split into tokens and `:` separators.
#[derive(Clone, Copy)]
pub(super) enum Piece<'a> {
    Word(Token<'a>),
    Colon(u32),
}

/// Splits `text` (which starts at column `col0 + 1`) into words and colons.
fn pieces(text: &str, col0: u32) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut start: Option<(usize, u32)> = None;
    let mut col = col0;
    for (byte, ch) in text.char_indices() {
        col = col.saturating_add(1);
        let separator = ch.is_whitespace() || ch == ':';
        if separator {
            if let Some((s, c)) = start.take() {
                out.push(Piece::Word(Token {
                    text: &text[s..byte],
                    col: c,
                }));
            }
            if ch == ':' {
                out.push(Piece::Colon(col));
            }
        } else if start.is_none() {
            start = Some((byte, col));
        }
    }
    if let Some((s, c)) = start {
        out.push(Piece::Word(Token {
            text: &text[s..],
            col: c,
        }));
    }
    out
}

/// The first blank-delimited word of `text` at or after byte `from`:
/// `(start byte, end byte, column of its first character)`.
fn blank_word(text: &str, from: usize) -> Option<(usize, usize, u32)> {
    let start = from + text[from..].find(|c: char| !c.is_whitespace())?;
    let len = text[start..]
        .find(char::is_whitespace)
        .unwrap_or(text.len() - start);
    Some((start, start + len, width(&text[..start]) + 1))
}

/// The line as pieces, with an IPv6 destination kept whole: `:` separates
/// fields everywhere except inside a destination word holding two or more
/// colons (an IPv4 address never has one, a misplaced field `:` only one).
pub(super) fn split_line(line: &str) -> Vec<Piece<'_>> {
    let Some((mut start, mut end, mut col)) = blank_word(line, 0) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if line[start..end].starts_with('!') {
        out.push(Piece::Word(Token { text: "!", col }));
        if end - start == 1 {
            match blank_word(line, end) {
                Some(next) => (start, end, col) = next,
                None => return out,
            }
        } else {
            (start, col) = (start + 1, col + 1);
        }
    }
    let word = &line[start..end];
    if word.matches(':').count() < 2 {
        out.clear();
        return pieces(line, 0);
    }
    out.push(Piece::Word(Token { text: word, col }));
    let rest_col = width(&line[..end]);
    out.extend(pieces(&line[end..], rest_col));
    out
}
