//! The port fields (`DEST_PORTS`, `ORG_PORTS`) and the optional `PROTOCOL`.

use super::{
    LineError, cut, err,
    tokens::{Piece, Token},
};
use crate::rule::{Origin, PortRange, PortSet, Protocols};

/// `80, 81` or `80 ,81`: a port list cut by blanks, which would otherwise be
/// read as the list `80,` followed by a stray field. The error points at the
/// first blank and shows the list as one word.
pub(super) fn blank_in_port_list<'a>(
    list: Token<'a>,
    after: impl Iterator<Item = Piece<'a>>,
) -> Option<LineError> {
    let mut joined = list.text.to_string();
    for piece in after {
        match piece {
            Piece::Word(word) if joined.ends_with(',') || word.text.starts_with(',') => {
                joined.push_str(word.text);
            }
            _ => break,
        }
    }
    (joined.len() > list.text.len()).then(|| {
        LineError::new(
            list.col_at(list.text.len()),
            format!("a port list has no blanks: write `{}`", cut(&joined)),
        )
    })
}

/// `*`, or comma-separated ports and ranges: `389,636,3268-3269`.
pub(super) fn parse_port_list(token: Token<'_>) -> Result<PortSet, LineError> {
    let mut ranges = Vec::new();
    for part in token.split(',') {
        if part.text.is_empty() {
            return err(
                part.col,
                format!("empty entry in the port list `{}`", cut(token.text)),
            );
        }
        ranges.push(parse_port_range(part, "destination")?);
    }
    Ok(PortSet::new(ranges).expect("split yields at least one part"))
}

fn parse_port_range(token: Token<'_>, what: &str) -> Result<PortRange, LineError> {
    if token.text == "*" {
        return Ok(PortRange::ANY);
    }
    let (lo_text, hi) = match token.text.split_once('-') {
        Some((lo, hi)) => (lo, Some((hi, token.col_at(lo.len() + 1)))),
        None => (token.text, None),
    };
    let lo = parse_port(lo_text, token.col, what)?;
    let Some((hi_text, hi_col)) = hi else {
        return Ok(PortRange { lo, hi: lo });
    };
    let hi = parse_port(hi_text, hi_col, what)?;
    if hi < lo {
        return err(
            token.col,
            format!(
                "reversed {what} port range `{}`: {lo} > {hi}",
                cut(token.text)
            ),
        );
    }
    Ok(PortRange { lo, hi })
}

fn parse_port(text: &str, col: u32, what: &str) -> Result<u16, LineError> {
    if text.is_empty() {
        return err(col, format!("missing {what} port number"));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return err(
            col,
            format!("bad {what} port `{}`: expected a number 0-65535", cut(text)),
        );
    }
    match text.parse::<u32>() {
        Ok(v) if v <= 65535 => Ok(v as u16),
        _ => err(
            col,
            format!("{what} port `{}` is larger than 65535", cut(text)),
        ),
    }
}

pub(super) fn parse_origin(token: Token<'_>) -> Result<Origin, LineError> {
    if token.text.eq_ignore_ascii_case("deny") {
        return Ok(Origin::Deny);
    }
    if token.text.bytes().any(|b| b.is_ascii_alphabetic()) {
        return err(
            token.col,
            format!(
                "origin `{}`: a port, a range like 65000-65100, 0 (the OS chooses) or deny",
                cut(token.text)
            ),
        );
    }
    if token.text == "*" {
        return err(
            token.col,
            "origin ports cannot be `*`; write 0 to let the OS choose",
        );
    }
    if token.text.contains(',') {
        return err(
            token.col,
            "origin ports are one port or one range; lists are for destination ports",
        );
    }
    let range = parse_port_range(token, "origin")?;
    match (range.lo, range.hi) {
        (0, 0) => Ok(Origin::Os),
        (0, _) => err(
            token.col,
            "an origin range cannot include port 0 (0 alone means \"let the OS choose\")",
        ),
        _ => Ok(Origin::Range(range)),
    }
}

pub(super) fn parse_protocols(token: Token<'_>) -> Result<Protocols, LineError> {
    match token.text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocols::TCP),
        "udp" => Ok(Protocols::UDP),
        "tcp+udp" | "udp+tcp" => Ok(Protocols::BOTH),
        _ => err(
            token.col,
            format!(
                "unknown protocol `{}`: expected tcp, udp or tcp+udp",
                cut(token.text)
            ),
        ),
    }
}
