//! The tcpoport.ini grammar: text -> ordered [`Rule`]s, or every error at once.
//!
//! ```text
//! [!] DEST_IP DEST_PORTS : ORG_PORTS
//! ```
//!
//! * `DEST_IP`: `10.1.1.1`, an octet pattern (`10.*.*.*`, `10.*.5.*`) or a DNS name.
//! * `DEST_PORTS`: `21`, `2200-2300` (inclusive) or `*`.
//! * `ORG_PORTS`: `65001`, `65000-65100`, or `0` ("let the OS choose").
//! * `!` negates the destination match: the rule matches when the address is
//!   outside the pattern **or** the port is outside the port set.
//!
//! Blank lines and lines starting with `#` or `;` are ignored. Whitespace around
//! the fields is free, but the address and the destination ports must be
//! separated by at least one blank (`10.1.1.1 21`, never `10.1.1.121`).
//!
//! Parsing never stops at the first bad line: [`parse`] returns all errors, one
//! per bad line, each with the 1-based line and column it starts at.

use std::{fmt, net::Ipv4Addr, ops::RangeInclusive};

/// One rule, as written on one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// 1-based line number in the file.
    pub line: u32,
    /// The rule's text with surrounding whitespace removed, for reports.
    pub text: String,
    pub negated: bool,
    pub dest: Dest,
    pub dest_ports: PortRange,
    pub origin: Origin,
}

/// What a rule's `DEST_IP` field names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// An address or an octet pattern.
    Pattern(Ipv4Pattern),
    /// A DNS name, resolved by the loader (see `resolve`).
    Name(String),
}

/// An IPv4 address pattern: each octet matches an inclusive range of values.
/// A literal octet is the range `v..=v`, `*` is `0..=255`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Pattern {
    pub octets: [OctetRange; 4],
}

/// An inclusive range of octet values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OctetRange {
    pub lo: u8,
    pub hi: u8,
}

impl OctetRange {
    pub const ANY: Self = Self { lo: 0, hi: 255 };

    pub const fn exact(v: u8) -> Self {
        Self { lo: v, hi: v }
    }

    pub const fn is_any(self) -> bool {
        self.lo == 0 && self.hi == 255
    }

    pub const fn contains(self, v: u8) -> bool {
        self.lo <= v && v <= self.hi
    }
}

impl Ipv4Pattern {
    pub fn exact(addr: Ipv4Addr) -> Self {
        Self {
            octets: addr.octets().map(OctetRange::exact),
        }
    }

    pub fn matches(&self, addr: Ipv4Addr) -> bool {
        self.octets
            .iter()
            .zip(addr.octets())
            .all(|(range, v)| range.contains(v))
    }
}

/// An inclusive port range; `*` is `0..=65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ANY: Self = Self {
        lo: 0,
        hi: u16::MAX,
    };

    pub const fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    pub const fn is_any(self) -> bool {
        self.lo == 0 && self.hi == u16::MAX
    }

    /// Number of ports in the range.
    pub const fn size(self) -> u32 {
        self.hi as u32 - self.lo as u32 + 1
    }

    pub fn as_range(self) -> RangeInclusive<u16> {
        self.lo..=self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("*")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// What a matching rule does with the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// `0`: leave the socket alone; the OS chooses the port.
    Os,
    /// Bind to a free port of this range (never port 0).
    Range(PortRange),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Os => f.write_str("0 (OS choice)"),
            Self::Range(range) => range.fmt(f),
        }
    }
}

/// A malformed line: where it is wrong and why, without the file name
/// (see [`ParseError::in_file`] for the `file:line:col: message` form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: u32,
    /// 1-based column, counted in characters.
    pub col: u32,
    pub message: String,
}

impl ParseError {
    /// `file:line:col: message`, the form every tool (and editor) understands.
    pub fn in_file(&self, file: &str) -> String {
        format!("{file}:{}:{}: {}", self.line, self.col, self.message)
    }
}

/// Parses a whole rule file. Returns every rule in file order, or every error.
pub fn parse(text: &str) -> Result<Vec<Rule>, Vec<ParseError>> {
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for (index, line_text) in text.lines().enumerate() {
        let line = u32::try_from(index + 1).unwrap_or(u32::MAX);
        match parse_line(line_text) {
            Ok(Some(mut rule)) => {
                rule.line = line;
                rules.push(rule);
            }
            Ok(None) => {}
            Err(LineError { col, message }) => errors.push(ParseError { line, col, message }),
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

struct LineError {
    col: u32,
    message: String,
}

fn err<T>(col: u32, message: impl Into<String>) -> Result<T, LineError> {
    Err(LineError {
        col,
        message: message.into(),
    })
}

/// A run of characters that is neither whitespace nor `:`, with its column.
#[derive(Clone, Copy)]
struct Token<'a> {
    text: &'a str,
    col: u32,
}

impl Token<'_> {
    /// Column of the character at byte offset `byte` inside the token.
    fn col_at(&self, byte: usize) -> u32 {
        self.col + self.text[..byte].chars().count() as u32
    }
}

/// The line split into tokens and `:` separators.
enum Piece<'a> {
    Word(Token<'a>),
    Colon(u32),
}

fn pieces(line: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut start: Option<(usize, u32)> = None;
    let mut col = 0u32;
    for (byte, ch) in line.char_indices() {
        col += 1;
        let separator = ch.is_whitespace() || ch == ':';
        if separator {
            if let Some((s, c)) = start.take() {
                out.push(Piece::Word(Token {
                    text: &line[s..byte],
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
            text: &line[s..],
            col: c,
        }));
    }
    out
}

fn parse_line(line: &str) -> Result<Option<Rule>, LineError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
        return Ok(None);
    }
    let end_col = line.trim_end().chars().count() as u32 + 1;
    let mut pieces = pieces(line).into_iter().peekable();

    // Optional `!`, either alone (`! 10.*.*.*`) or glued to the address (`!10.*.*.*`).
    let mut negated = false;
    let mut first = pieces.next();
    if let Some(Piece::Word(token)) = first
        && let Some(rest) = token.text.strip_prefix('!')
    {
        negated = true;
        first = if rest.is_empty() {
            pieces.next()
        } else {
            Some(Piece::Word(Token {
                text: rest,
                col: token.col + 1,
            }))
        };
        if first.is_none() {
            return err(token.col, "`!` without a rule after it");
        }
    }

    let dest_token = match first {
        Some(Piece::Word(token)) => token,
        Some(Piece::Colon(col)) => return err(col, "missing destination address before `:`"),
        None => unreachable!("non-blank line has a piece"),
    };
    let dest = parse_dest(dest_token)?;

    let ports_token = match pieces.next() {
        Some(Piece::Word(token)) => token,
        Some(Piece::Colon(col)) => {
            return err(
                col,
                "missing destination ports before `:` (a port, a range like 2200-2300, or `*`)",
            );
        }
        None => {
            return err(
                end_col,
                "missing destination ports and `: ORIGIN_PORTS` after the address",
            );
        }
    };
    let dest_ports = parse_port_range(ports_token, "destination")?;

    match pieces.next() {
        Some(Piece::Colon(_)) => {}
        Some(Piece::Word(token)) => {
            return err(
                token.col,
                format!(
                    "expected `:` between destination ports and origin ports, found `{}`",
                    token.text
                ),
            );
        }
        None => {
            return err(
                end_col,
                "missing `:` and origin ports after the destination",
            );
        }
    }

    let origin = match pieces.next() {
        Some(Piece::Word(token)) => parse_origin(token)?,
        Some(Piece::Colon(col)) => return err(col, "unexpected second `:`"),
        None => {
            return err(
                end_col,
                "missing origin ports after `:` (a port, a range like 65000-65100, or 0)",
            );
        }
    };

    if let Some(extra) = pieces.next() {
        let (col, what) = match extra {
            Piece::Word(token) => (token.col, format!("`{}`", token.text)),
            Piece::Colon(col) => (col, "`:`".to_string()),
        };
        return err(col, format!("unexpected {what} after the origin ports"));
    }

    Ok(Some(Rule {
        line: 0,
        text: trimmed.to_string(),
        negated,
        dest,
        dest_ports,
        origin,
    }))
}

fn parse_dest(token: Token<'_>) -> Result<Dest, LineError> {
    let text = token.text;
    let looks_numeric = text
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'*');
    if looks_numeric {
        return parse_pattern(token).map(Dest::Pattern);
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

fn parse_pattern(token: Token<'_>) -> Result<Ipv4Pattern, LineError> {
    let parts: Vec<&str> = token.text.split('.').collect();
    if parts.len() != 4 {
        return err(
            token.col,
            format!(
                "an IPv4 address or pattern has 4 octets, `{}` has {}",
                token.text,
                parts.len()
            ),
        );
    }
    let mut octets = [OctetRange::ANY; 4];
    let mut byte = 0;
    for (slot, part) in octets.iter_mut().zip(parts) {
        let col = token.col_at(byte);
        *slot = parse_octet(part, col)?;
        byte += part.len() + 1;
    }
    Ok(Ipv4Pattern { octets })
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
            format!("bad octet `{part}`: `*` must be the whole octet"),
        );
    }
    if part.len() > 1 && part.starts_with('0') {
        // inet_aton would read this as octal; refuse instead of guessing.
        return err(
            col,
            format!("bad octet `{part}`: leading zeros are ambiguous"),
        );
    }
    match part.parse::<u16>() {
        Ok(v) if v <= 255 => Ok(OctetRange::exact(v as u8)),
        _ => err(col, format!("bad octet `{part}`: must be 0-255 or `*`")),
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and `-`.
fn validate_name(token: Token<'_>) -> Result<(), LineError> {
    let text = token.text;
    if text.len() > 253 {
        return err(token.col, "DNS name longer than 253 characters");
    }
    let mut byte = 0;
    for label in text.strip_suffix('.').unwrap_or(text).split('.') {
        let col = token.col_at(byte);
        if label.is_empty() {
            return err(col, format!("bad DNS name `{text}`: empty label"));
        }
        if label.len() > 63 {
            return err(col, format!("bad DNS name `{text}`: label longer than 63"));
        }
        if let Some(pos) = label
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'-'))
        {
            let ch = label[pos..].chars().next().unwrap_or('?');
            return err(
                token.col_at(byte + pos),
                format!("bad DNS name `{text}`: unexpected character `{ch}`"),
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return err(
                col,
                format!("bad DNS name `{text}`: a label cannot start or end with `-`"),
            );
        }
        byte += label.len() + 1;
    }
    Ok(())
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
            format!("reversed {what} port range `{}`: {lo} > {hi}", token.text),
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
            format!("bad {what} port `{text}`: expected a number 0-65535"),
        );
    }
    match text.parse::<u32>() {
        Ok(v) if v <= 65535 => Ok(v as u16),
        _ => err(col, format!("{what} port `{text}` is larger than 65535")),
    }
}

fn parse_origin(token: Token<'_>) -> Result<Origin, LineError> {
    if token.text == "*" {
        return err(
            token.col,
            "origin ports cannot be `*`; write 0 to let the OS choose",
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

/// The reference semantics: the first rule (in file order) whose condition
/// holds decides. `addr_matches(rule)` says whether the rule's `DEST_IP` covers
/// the destination (patterns directly, names through their resolved addresses).
///
/// This is deliberately the slow, obvious reading of the spec; the compiled
/// lookup is tested against it.
pub fn first_match<'r, R>(
    rules: impl IntoIterator<Item = &'r R>,
    port: u16,
    mut addr_matches: impl FnMut(&R) -> bool,
    rule_of: impl Fn(&R) -> &Rule,
) -> Option<&'r R>
where
    R: 'r,
{
    rules.into_iter().find(|candidate| {
        let rule = rule_of(candidate);
        let hit = addr_matches(candidate) && rule.dest_ports.contains(port);
        hit != rule.negated
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Rule {
        let mut rules = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e:?}"));
        assert_eq!(rules.len(), 1, "{text:?}");
        rules.remove(0)
    }

    fn error(text: &str) -> (u32, u32, String) {
        let errors = parse(text).expect_err(text);
        assert_eq!(errors.len(), 1, "{text:?}: {errors:?}");
        let e = &errors[0];
        (e.line, e.col, e.message.clone())
    }

    fn pat(a: &str) -> Dest {
        let Ok(Dest::Pattern(p)) = parse_dest(Token { text: a, col: 1 }) else {
            panic!("{a}")
        };
        Dest::Pattern(p)
    }

    #[test]
    fn address_single_port_single_origin() {
        let r = one("10.1.1.1 21: 65001");
        assert!(!r.negated);
        assert_eq!(
            r.dest,
            Dest::Pattern(Ipv4Pattern::exact([10, 1, 1, 1].into()))
        );
        assert_eq!(r.dest_ports, PortRange { lo: 21, hi: 21 });
        assert_eq!(
            r.origin,
            Origin::Range(PortRange {
                lo: 65001,
                hi: 65001
            })
        );
        assert_eq!(r.line, 1);
        assert_eq!(r.text, "10.1.1.1 21: 65001");
    }

    #[test]
    fn patterns_with_trailing_and_middle_wildcards() {
        let Dest::Pattern(p) = one("10.*.*.* *: 64000-64100").dest else {
            panic!()
        };
        assert_eq!(p.octets[0], OctetRange::exact(10));
        assert!(p.octets[1..].iter().all(|o| o.is_any()));
        let Dest::Pattern(p) = one("10.*.5.* *: 1").dest else {
            panic!()
        };
        assert!(p.matches([10, 200, 5, 9].into()));
        assert!(!p.matches([10, 200, 6, 9].into()));
        assert!(!p.matches([11, 200, 5, 9].into()));
        assert_eq!(pat("*.*.*.*"), one("*.*.*.* * : 1").dest);
    }

    #[test]
    fn dns_names_are_lowercased() {
        assert_eq!(
            one("Machine.Domain 21 : 5000").dest,
            Dest::Name("machine.domain".into())
        );
        assert_eq!(
            one("localhost * : 5000").dest,
            Dest::Name("localhost".into())
        );
        assert_eq!(one("a-b.c. * : 5000").dest, Dest::Name("a-b.c.".into()));
    }

    #[test]
    fn port_forms() {
        assert_eq!(one("1.2.3.4 * : 0").dest_ports, PortRange::ANY);
        assert_eq!(
            one("1.2.3.4 2200-2300 : 0").dest_ports,
            PortRange { lo: 2200, hi: 2300 }
        );
        assert_eq!(one("1.2.3.4 0-65535 : 0").dest_ports, PortRange::ANY);
        assert_eq!(one("1.2.3.4 * : 0").origin, Origin::Os);
        assert_eq!(
            one("1.2.3.4 * : 65000-65100").origin,
            Origin::Range(PortRange {
                lo: 65000,
                hi: 65100
            })
        );
    }

    #[test]
    fn negation_forms() {
        assert!(one("! 10.*.*.*  *:  42000-43000").negated);
        assert!(one("!10.*.*.* *: 42000").negated);
        assert!(one("  !   10.*.*.* * : 42000").negated);
    }

    #[test]
    fn whitespace_is_free_around_the_colon() {
        let want = one("10.*.*.* * : 42000");
        for text in [
            "10.*.*.* *:42000",
            "10.*.*.*\t*  :\t42000",
            "   10.*.*.*   *:   42000   ",
            "10.*.*.* *: 42000",
            "10.*.*.* * :42000",
        ] {
            let r = one(text);
            assert_eq!(
                (r.dest, r.dest_ports, r.origin),
                (want.dest.clone(), want.dest_ports, want.origin),
                "{text}"
            );
        }
    }

    #[test]
    fn comments_and_blank_lines() {
        let rules = parse("# header\n\n   ; other comment\n \t \n1.2.3.4 * : 0\n#x").unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].line, 5);
    }

    #[test]
    fn error_positions() {
        let cases: &[(&str, u32, &str)] = &[
            ("10.1.256.1 21 : 5", 6, "bad octet `256`"),
            ("10.1.1 21 : 5", 1, "4 octets"),
            ("10.1.1.1.1 21 : 5", 1, "4 octets"),
            ("10..1.1 21 : 5", 4, "empty octet"),
            ("10.1*.1.1 21 : 5", 4, "`*` must be the whole octet"),
            ("10.01.1.1 21 : 5", 4, "leading zeros"),
            ("10.1.1.1 70000 : 5", 10, "larger than 65535"),
            ("10.1.1.1 21 : 65536", 15, "larger than 65535"),
            (
                "10.1.1.1 2300-2200 : 5",
                10,
                "reversed destination port range",
            ),
            ("10.1.1.1 21 : 200-100", 15, "reversed origin port range"),
            ("10.1.1.1 21-x : 5", 13, "bad destination port `x`"),
            ("10.1.1.1 21- : 5", 13, "missing destination port number"),
            ("10.1.1.1 21 5000", 13, "expected `:`"),
            ("10.1.1.1 21", 12, "missing `:`"),
            ("10.1.1.1 : 5", 10, "missing destination ports"),
            ("10.1.1.1", 9, "missing destination ports"),
            (": 5", 1, "missing destination address"),
            ("10.1.1.1 21 :", 14, "missing origin ports"),
            ("10.1.1.1 21 : 5 junk", 17, "unexpected `junk`"),
            ("10.1.1.1 21 : 5 : 6", 17, "unexpected `:`"),
            ("10.1.1.1 21 :: 5", 14, "second `:`"),
            ("!", 1, "`!` without a rule"),
            ("   !  ", 4, "`!` without a rule"),
            ("10.1.1.1 * : *", 14, "cannot be `*`"),
            ("10.1.1.1 * : 0-100", 14, "cannot include port 0"),
            ("ex*ample.com * : 5", 3, "`*` is only allowed"),
            ("bad_name.com * : 5", 4, "unexpected character `_`"),
            ("-bad.com * : 5", 1, "cannot start or end"),
            ("a..b * : 5", 3, "empty label"),
        ];
        for (text, col, message) in cases {
            let (line, got_col, got) = error(text);
            assert_eq!(line, 1, "{text}");
            assert!(got.contains(message), "{text}: {got}");
            assert_eq!(got_col, *col, "{text}: {got}");
        }
    }

    #[test]
    fn every_bad_line_is_reported_with_file_line_col() {
        let text = "1.2.3.4 * : 5\n1.2.3 * : 5\n\n1.2.3.4 * 5\n1.2.3.4 * : 6\n";
        let errors = parse(text).unwrap_err();
        let shown: Vec<String> = errors.iter().map(|e| e.in_file("t.ini")).collect();
        assert_eq!(shown.len(), 2);
        assert!(shown[0].starts_with("t.ini:2:1: "), "{shown:?}");
        assert!(shown[1].starts_with("t.ini:4:11: "), "{shown:?}");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        // U+00A0 (no-break space) is whitespace and two bytes long: the bad
        // port is the 13th character but starts at byte 14.
        let (_, col, message) = error("1.2.3.4\u{a0}* : 70000");
        assert_eq!(col, 13, "{message}");
    }

    #[test]
    fn first_match_honours_order_and_negation() {
        let rules = parse("! 10.*.*.* 22 : 100\n10.*.*.* * : 200\n").unwrap();
        let decide = |ip: [u8; 4], port| {
            first_match(
                &rules,
                port,
                |r| match &r.dest {
                    Dest::Pattern(p) => p.matches(ip.into()),
                    Dest::Name(_) => false,
                },
                |r| r,
            )
            .map(|r| r.line)
        };
        assert_eq!(decide([10, 0, 0, 1], 22), Some(2)); // inside 10/8 port 22 -> not negated hit
        assert_eq!(decide([10, 0, 0, 1], 80), Some(1)); // port outside the set -> negation matches
        assert_eq!(decide([11, 0, 0, 1], 22), Some(1)); // address outside -> negation matches
    }
}
