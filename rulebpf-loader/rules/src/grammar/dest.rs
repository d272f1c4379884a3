//! The `DEST_IP` field: an IPv4 address, octet pattern or prefix, an IPv6
//! address or prefix, or a DNS name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    LineError, cut, err,
    tokens::{Token, width},
};
use crate::rule::{AddrPattern, Dest, OctetRange};

pub(super) fn parse_dest(token: Token<'_>) -> Result<Dest, LineError> {
    let text = token.text;
    if text == "*" {
        return Ok(Dest::Any);
    }
    if text.contains(':') {
        return parse_ipv6(token).map(Dest::Pattern);
    }
    let looks_numeric = text
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'*' || b == b'/');
    if looks_numeric {
        return match text.split_once('/') {
            Some((addr, len)) => parse_ipv4_prefix(token, addr, len).map(Dest::Pattern),
            None => parse_pattern(token).map(Dest::Pattern),
        };
    }
    if let Some(star) = text.find('*') {
        return err(
            token.col_at(star),
            "`*` is only allowed as a whole octet of an IPv4 pattern (like 10.*.*.*)",
        );
    }
    validate_name(token)?;
    Ok(Dest::Name(text.to_ascii_lowercase()))
}

fn parse_pattern(token: Token<'_>) -> Result<AddrPattern, LineError> {
    let count = token.text.split('.').count();
    if count != 4 {
        return err(
            token.col,
            format!(
                "an IPv4 address or pattern has 4 octets, `{}` has {count}",
                cut(token.text),
            ),
        );
    }
    let mut octets = [OctetRange::ANY; 4];
    for (slot, part) in octets.iter_mut().zip(token.split('.')) {
        *slot = parse_octet(part.text, part.col)?;
    }
    Ok(AddrPattern::V4(octets))
}

/// `10.0.0.0/8`: the address must be a plain IPv4 address without host bits.
fn parse_ipv4_prefix(token: Token<'_>, addr: &str, len: &str) -> Result<AddrPattern, LineError> {
    let AddrPattern::V4(octets) = parse_pattern(Token {
        text: addr,
        col: token.col,
    })?
    else {
        unreachable!("parse_pattern returns IPv4")
    };
    if octets.iter().any(|o| o.lo != o.hi) {
        return err(
            token.col,
            format!(
                "`{}`: a prefix needs a plain address, not `*`",
                cut(token.text)
            ),
        );
    }
    let base = Ipv4Addr::from(octets.map(|o| o.lo));
    let len = parse_prefix_len(token, addr.len() + 1, len, 32)?;
    prefix_pattern(token, IpAddr::V4(base), len)
}

/// `2001:db8::10` or `2001:db8::/32`.
fn parse_ipv6(token: Token<'_>) -> Result<AddrPattern, LineError> {
    if let Some(inner) = token.text.strip_prefix('[') {
        // The URL form (`[::1]`, `[::1]:443`): the rule file needs no
        // brackets, an IPv6 destination ends at the first blank.
        let (addr, after) = inner.split_once(']').unwrap_or((inner, ""));
        let prefix = if after.starts_with('/') { after } else { "" };
        return err(
            token.col,
            format!(
                "write an IPv6 address without brackets: `{}`",
                cut(&format!("{addr}{prefix}"))
            ),
        );
    }
    let (addr_text, len_text) = match token.text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (token.text, None),
    };
    let addr: Ipv6Addr = addr_text
        .parse()
        .map_err(|_| LineError::new(token.col, format!("bad IPv6 address `{}`", cut(addr_text))))?;
    if let Some(v4) = addr.to_ipv4_mapped() {
        return err(
            token.col,
            format!(
                "`{addr_text}` is IPv4-mapped: write the IPv4 address {v4} (v4-mapped \
                 destinations are matched against the IPv4 rules)"
            ),
        );
    }
    match len_text {
        None => Ok(AddrPattern::exact(IpAddr::V6(addr))),
        Some(len) => {
            let len = parse_prefix_len(token, addr_text.len() + 1, len, 128)?;
            prefix_pattern(token, IpAddr::V6(addr), len)
        }
    }
}

fn parse_prefix_len(token: Token<'_>, byte: usize, text: &str, max: u8) -> Result<u8, LineError> {
    let col = token.col_at(byte);
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return err(
            col,
            format!("bad prefix length `{}`: expected 0-{max}", cut(text)),
        );
    }
    match text.parse::<u16>() {
        Ok(v) if v <= u16::from(max) => Ok(v as u8),
        _ => err(
            col,
            format!("prefix length `{}` is longer than {max}", cut(text)),
        ),
    }
}

/// The pattern of `base/len`, refusing host bits (`10.1.2.3/8` is a typo
/// for either `10.1.2.3` or `10.0.0.0/8`; guessing would be wrong half the time).
fn prefix_pattern(token: Token<'_>, base: IpAddr, len: u8) -> Result<AddrPattern, LineError> {
    let network = match base {
        IpAddr::V4(a) => IpAddr::V4(
            ipnet::Ipv4Net::new(a, len)
                .map(|n| n.network())
                .unwrap_or(a),
        ),
        IpAddr::V6(a) => IpAddr::V6(
            ipnet::Ipv6Net::new(a, len)
                .map(|n| n.network())
                .unwrap_or(a),
        ),
    };
    if network != base {
        return err(
            token.col,
            format!(
                "`{}` has host bits set: the network is {network}/{len}",
                token.text
            ),
        );
    }
    Ok(AddrPattern::prefix(base, len))
}

fn parse_octet(part: &str, col: u32) -> Result<OctetRange, LineError> {
    if part == "*" {
        return Ok(OctetRange::ANY);
    }
    if part.is_empty() {
        return err(col, "empty octet");
    }
    if part.contains('*') {
        return err(
            col,
            format!("bad octet `{}`: `*` must be the whole octet", cut(part)),
        );
    }
    if part.len() > 1 && part.starts_with('0') {
        // inet_aton would read this as octal; refuse instead of guessing.
        return err(
            col,
            format!("bad octet `{}`: leading zeros are ambiguous", cut(part)),
        );
    }
    match part.parse::<u16>() {
        Ok(v) if v <= 255 => Ok(OctetRange::exact(v as u8)),
        _ => err(
            col,
            format!("bad octet `{}`: must be 0-255 or `*`", cut(part)),
        ),
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and `-`.
fn validate_name(token: Token<'_>) -> Result<(), LineError> {
    let text = token.text;
    if text.len() > 253 {
        return err(token.col, "DNS name longer than 253 characters");
    }
    let labels = Token {
        text: text.strip_suffix('.').unwrap_or(text),
        col: token.col,
    };
    for Token { text: label, col } in labels.split('.') {
        if label.is_empty() {
            return err(col, format!("bad DNS name `{text}`: empty label"));
        }
        if label.len() > 63 {
            return err(col, format!("bad DNS name `{text}`: label longer than 63"));
        }
        if let Some((pos, ch)) = label
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '-'))
        {
            return err(
                col.saturating_add(width(&label[..pos])),
                format!("bad DNS name `{text}`: unexpected character `{ch}`"),
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return err(
                col,
                format!("bad DNS name `{text}`: a label cannot start or end with `-`"),
            );
        }
    }
    Ok(())
}
