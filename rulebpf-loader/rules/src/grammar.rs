//! The tcpoport.ini grammar: text -> ordered [`Rule`]s, or every error at once.
//!
//! ```text
//! [!] DEST_IP DEST_PORTS : ORG_PORTS [PROTOCOL]
//! ```
//!
//! * `DEST_IP`: `10.1.1.1`, an octet pattern (`10.*.*.*`, `10.*.5.*`), an IPv4
//!   prefix (`10.0.0.0/8`), an IPv6 address or prefix (`2001:db8::10`,
//!   `2001:db8::/32`) or a DNS name (its IPv4 and IPv6 addresses).
//! * `DEST_PORTS`: `21`, `2200-2300` (inclusive), `*`, or a list of those
//!   (`389,636,3268-3269`).
//! * `ORG_PORTS`: `65001`, `65000-65100`, or `0` ("let the OS choose").
//! * `PROTOCOL`: `tcp`, `udp` or `tcp+udp`, any case; TCP when left out, as in
//!   the original tcpoport.ini.
//! * `!` negates the destination match: the rule matches when the address is
//!   outside the pattern **or** the port is outside the port set. The protocol
//!   and the address family are not negated: `! 10.*.*.*` is about IPv4
//!   destinations only.
//!
//! Blank lines and lines starting with `#` or `;` are ignored. Whitespace around
//! the fields is free, but the address and the destination ports must be
//! separated by at least one blank (`10.1.1.1 21`, never `10.1.1.121`). An
//! IPv6 destination (a word with two or more `:`) ends at the first blank.
//!
//! Parsing never stops at the first bad line: [`parse`] returns all errors, one
//! per bad line, each with the 1-based line and column it starts at.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

/// One rule, as written on one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// 1-based line number in the file.
    pub line: u32,
    /// The rule's text with surrounding whitespace removed, for reports.
    pub text: String,
    pub negated: bool,
    pub dest: Dest,
    pub dest_ports: PortSet,
    pub origin: Origin,
    pub protocols: Protocols,
}

impl Rule {
    /// Whether the rule speaks about destinations of this family at all
    /// (IPv6 or not). Names cover both families; patterns their own.
    pub fn covers_family(&self, ipv6: bool) -> bool {
        match &self.dest {
            Dest::Pattern(p) => p.is_ipv6() == ipv6,
            Dest::Name(_) => true,
        }
    }
}

/// What a rule's `DEST_IP` field names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// An address, an octet pattern or a prefix.
    Pattern(AddrPattern),
    /// A DNS name, resolved by the loader (see `resolve`).
    Name(String),
}

/// An address pattern: each octet of the address matches an inclusive range of
/// values. A literal octet is the range `v..=v`, `*` is `0..=255`; a prefix
/// `/n` fixes the first `n` bits, which is one range per octet too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrPattern {
    V4([OctetRange; 4]),
    V6([OctetRange; 16]),
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

impl AddrPattern {
    /// Exactly one address (an IPv4-mapped IPv6 address is an IPv4 one).
    pub fn exact(addr: IpAddr) -> Self {
        match canonical(addr) {
            IpAddr::V4(a) => Self::V4(a.octets().map(OctetRange::exact)),
            IpAddr::V6(a) => Self::V6(a.octets().map(OctetRange::exact)),
        }
    }

    /// The addresses whose first `len` bits are those of `addr`.
    pub fn prefix(addr: IpAddr, len: u8) -> Self {
        fn octets<const N: usize>(bytes: [u8; N], len: u8) -> [OctetRange; N] {
            let mut out = [OctetRange::ANY; N];
            for (k, (slot, byte)) in out.iter_mut().zip(bytes).enumerate() {
                let fixed = (i32::from(len) - 8 * k as i32).clamp(0, 8) as u32;
                // `fixed` leading bits of the octet are given, the rest are free.
                let free = u8::MAX.checked_shr(fixed).unwrap_or(0);
                *slot = OctetRange {
                    lo: byte & !free,
                    hi: byte | free,
                };
            }
            out
        }
        match addr {
            IpAddr::V4(a) => Self::V4(octets(a.octets(), len)),
            IpAddr::V6(a) => Self::V6(octets(a.octets(), len)),
        }
    }

    pub fn octets(&self) -> &[OctetRange] {
        match self {
            Self::V4(o) => o,
            Self::V6(o) => o,
        }
    }

    pub const fn is_ipv6(&self) -> bool {
        matches!(self, Self::V6(_))
    }

    /// Whether `addr` (after [`canonical`]) is of this family and matches.
    pub fn matches(&self, addr: IpAddr) -> bool {
        let bytes = octets_of(canonical(addr));
        bytes.len() == self.octets().len()
            && self
                .octets()
                .iter()
                .zip(bytes)
                .all(|(range, v)| range.contains(v))
    }
}

/// The address a destination is matched as: an IPv4-mapped IPv6 address
/// (`::ffff:10.1.1.1`, what a dual-stack socket connects to for an IPv4 peer)
/// is the IPv4 address, and goes through the IPv4 rules.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The octets of an address, in network order.
pub fn octets_of(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
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

/// The destination ports of a rule: one or more ranges, as written
/// (`389,636,3268-3269`); a port is in the set when any range holds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortSet(Vec<PortRange>);

impl PortSet {
    pub fn any() -> Self {
        Self(vec![PortRange::ANY])
    }

    /// A set of the given ranges; `None` when there are none.
    pub fn new(ranges: Vec<PortRange>) -> Option<Self> {
        (!ranges.is_empty()).then_some(Self(ranges))
    }

    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }

    /// The set as sorted, disjoint, non-adjacent ranges.
    pub fn normalized(&self) -> Vec<PortRange> {
        let mut sorted = self.0.clone();
        sorted.sort_unstable_by_key(|r| r.lo);
        let mut out: Vec<PortRange> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match out.last_mut() {
                Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                    last.hi = last.hi.max(r.hi)
                }
                _ => out.push(r),
            }
        }
        out
    }

    /// Whether every port is in the set.
    pub fn is_any(&self) -> bool {
        self.normalized() == [PortRange::ANY]
    }

    /// The ports outside the set, as sorted disjoint ranges.
    pub fn complement(&self) -> Vec<PortRange> {
        let mut out = Vec::new();
        let mut next = 0u32;
        for r in self.normalized() {
            if u32::from(r.lo) > next {
                out.push(PortRange {
                    lo: next as u16,
                    hi: r.lo - 1,
                });
            }
            next = u32::from(r.hi) + 1;
        }
        if next <= u32::from(u16::MAX) {
            out.push(PortRange {
                lo: next as u16,
                hi: u16::MAX,
            });
        }
        out
    }
}

impl From<PortRange> for PortSet {
    fn from(range: PortRange) -> Self {
        Self(vec![range])
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            r.fmt(f)?;
        }
        Ok(())
    }
}

/// The protocols a rule applies to. UDP means connected UDP sockets: the hook
/// runs at connect(), so an unconnected `sendto()` is never given a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Protocols {
    pub tcp: bool,
    pub udp: bool,
}

impl Protocols {
    pub const TCP: Self = Self {
        tcp: true,
        udp: false,
    };
    pub const UDP: Self = Self {
        tcp: false,
        udp: true,
    };
    pub const BOTH: Self = Self {
        tcp: true,
        udp: true,
    };

    pub const fn covers(self, udp: bool) -> bool {
        if udp { self.udp } else { self.tcp }
    }
}

impl fmt::Display for Protocols {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.tcp, self.udp) {
            (true, true) => "tcp+udp",
            (false, true) => "udp",
            _ => "tcp",
        })
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

/// Splits `text` (which starts at column `col0 + 1`) into words and colons.
fn pieces(text: &str, col0: u32) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut start: Option<(usize, u32)> = None;
    let mut col = col0;
    for (byte, ch) in text.char_indices() {
        col += 1;
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
    let col = text[..start].chars().count() as u32 + 1;
    Some((start, start + len, col))
}

/// The line as pieces, with an IPv6 destination kept whole: `:` separates
/// fields everywhere except inside a destination word holding two or more
/// colons (an IPv4 address never has one, a misplaced field `:` only one).
fn split_line(line: &str) -> Vec<Piece<'_>> {
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
    let rest_col = line[..end].chars().count() as u32;
    out.extend(pieces(&line[end..], rest_col));
    out
}

fn parse_line(line: &str) -> Result<Option<Rule>, LineError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
        return Ok(None);
    }
    let end_col = line.trim_end().chars().count() as u32 + 1;
    let mut pieces = split_line(line).into_iter().peekable();

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
                "missing destination ports before `:` (a port, a range like 2200-2300, \
                 a list like 389,636, or `*`)",
            );
        }
        None => {
            return err(
                end_col,
                "missing destination ports and `: ORIGIN_PORTS` after the address",
            );
        }
    };
    let dest_ports = parse_port_list(ports_token)?;

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

    let protocols = match pieces.next() {
        None => Protocols::TCP,
        Some(Piece::Word(token)) => parse_protocols(token)?,
        Some(Piece::Colon(col)) => return err(col, "unexpected `:` after the origin ports"),
    };

    if let Some(extra) = pieces.next() {
        let (col, what) = match extra {
            Piece::Word(token) => (token.col, format!("`{}`", token.text)),
            Piece::Colon(col) => (col, "`:`".to_string()),
        };
        return err(col, format!("unexpected {what} after the protocol"));
    }

    Ok(Some(Rule {
        line: 0,
        text: trimmed.to_string(),
        negated,
        dest,
        dest_ports,
        origin,
        protocols,
    }))
}

fn parse_dest(token: Token<'_>) -> Result<Dest, LineError> {
    let text = token.text;
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
            format!("`{}`: a prefix needs a plain address, not `*`", token.text),
        );
    }
    let base = Ipv4Addr::from(octets.map(|o| o.lo));
    let len = parse_prefix_len(token, addr.len() + 1, len, 32)?;
    prefix_pattern(token, IpAddr::V4(base), len)
}

/// `2001:db8::10` or `2001:db8::/32`.
fn parse_ipv6(token: Token<'_>) -> Result<AddrPattern, LineError> {
    let (addr_text, len_text) = match token.text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (token.text, None),
    };
    let addr: Ipv6Addr = addr_text.parse().map_err(|_| LineError {
        col: token.col,
        message: format!("bad IPv6 address `{addr_text}`"),
    })?;
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
        return err(col, format!("bad prefix length `{text}`: expected 0-{max}"));
    }
    match text.parse::<u16>() {
        Ok(v) if v <= u16::from(max) => Ok(v as u8),
        _ => err(col, format!("prefix length `{text}` is longer than {max}")),
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

/// `*`, or comma-separated ports and ranges: `389,636,3268-3269`.
fn parse_port_list(token: Token<'_>) -> Result<PortSet, LineError> {
    let mut ranges = Vec::new();
    let mut byte = 0;
    for part in token.text.split(',') {
        let col = token.col_at(byte);
        if part.is_empty() {
            return err(
                col,
                format!("empty entry in the port list `{}`", token.text),
            );
        }
        ranges.push(parse_port_range(Token { text: part, col }, "destination")?);
        byte += part.len() + 1;
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

fn parse_protocols(token: Token<'_>) -> Result<Protocols, LineError> {
    match token.text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocols::TCP),
        "udp" => Ok(Protocols::UDP),
        "tcp+udp" | "udp+tcp" => Ok(Protocols::BOTH),
        _ => err(
            token.col,
            format!(
                "unknown protocol `{}`: expected tcp, udp or tcp+udp",
                token.text
            ),
        ),
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

    fn ip4(o: [u8; 4]) -> IpAddr {
        IpAddr::from(o)
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
            Dest::Pattern(AddrPattern::exact([10, 1, 1, 1].into()))
        );
        assert_eq!(r.dest_ports, PortRange { lo: 21, hi: 21 }.into());
        assert_eq!(r.protocols, Protocols::TCP);
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
        assert_eq!(p.octets()[0], OctetRange::exact(10));
        assert!(p.octets()[1..].iter().all(|o| o.is_any()));
        let Dest::Pattern(p) = one("10.*.5.* *: 1").dest else {
            panic!()
        };
        assert!(p.matches(ip4([10, 200, 5, 9])));
        assert!(!p.matches(ip4([10, 200, 6, 9])));
        assert!(!p.matches(ip4([11, 200, 5, 9])));
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
        assert_eq!(one("1.2.3.4 * : 0").dest_ports, PortSet::any());
        assert_eq!(
            one("1.2.3.4 2200-2300 : 0").dest_ports,
            PortRange { lo: 2200, hi: 2300 }.into()
        );
        assert!(one("1.2.3.4 0-65535 : 0").dest_ports.is_any());
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
                (want.dest.clone(), want.dest_ports.clone(), want.origin),
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
            ("10.1.1.1 21 : 5 junk", 17, "unknown protocol `junk`"),
            (
                "10.1.1.1 21 : 5 tcp junk",
                21,
                "unexpected `junk` after the protocol",
            ),
            ("10.1.1.1 21 : 5 : 6", 17, "unexpected `:`"),
            ("10.1.1.1 21,,22 : 5", 13, "empty entry in the port list"),
            ("10.1.1.1 21, : 5", 13, "empty entry in the port list"),
            ("10.1.1.1 21,x : 5", 13, "bad destination port `x`"),
            (
                "10.1.1.1 21,30-20 : 5",
                13,
                "reversed destination port range",
            ),
            ("10.1.1.1 21 : 5,6", 15, "lists are for destination ports"),
            ("10.0.0.0/33 * : 5", 10, "longer than 32"),
            ("10.0.0.0/ * : 5", 10, "bad prefix length"),
            (
                "10.1.2.3/8 * : 5",
                1,
                "host bits set: the network is 10.0.0.0/8",
            ),
            ("10.*.0.0/16 * : 5", 1, "plain address"),
            ("2001:db8::1::2 * : 5", 1, "bad IPv6 address"),
            ("2001:db8::/129 * : 5", 12, "longer than 128"),
            (
                "2001:db8::1/32 * : 5",
                1,
                "host bits set: the network is 2001:db8::/32",
            ),
            (
                "::ffff:10.1.1.1 * : 5",
                1,
                "write the IPv4 address 10.1.1.1",
            ),
            ("2001:db8::1 * : 5 sctp", 19, "unknown protocol `sctp`"),
            ("2001:db8::1 *", 14, "missing `:`"),
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
                    Dest::Pattern(p) => p.matches(ip4(ip)),
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

    #[test]
    fn port_lists() {
        let r = one("10.1.1.1 389,636,3268-3269 : 5000");
        assert_eq!(r.dest_ports.to_string(), "389,636,3268-3269");
        for port in [389, 636, 3268, 3269] {
            assert!(r.dest_ports.contains(port), "{port}");
        }
        for port in [388, 390, 635, 3267, 3270] {
            assert!(!r.dest_ports.contains(port), "{port}");
        }
        assert!(one("1.2.3.4 0-100,*,7 : 0").dest_ports.is_any());
        assert!(one("1.2.3.4 0-100,101-65535 : 0").dest_ports.is_any());
        assert_eq!(
            one("1.2.3.4 10-20,0,15-30 : 0").dest_ports.complement(),
            [
                PortRange { lo: 1, hi: 9 },
                PortRange {
                    lo: 31,
                    hi: u16::MAX
                }
            ]
        );
    }

    #[test]
    fn protocols_are_optional_and_case_insensitive() {
        assert_eq!(one("1.2.3.4 53 : 0").protocols, Protocols::TCP);
        assert_eq!(one("1.2.3.4 53 : 0 UDP").protocols, Protocols::UDP);
        assert_eq!(one("1.2.3.4 53 : 0 tcp").protocols, Protocols::TCP);
        assert_eq!(one("1.2.3.4 53 : 0 Tcp+Udp").protocols, Protocols::BOTH);
        assert_eq!(one("1.2.3.4 53:0 udp+tcp").protocols, Protocols::BOTH);
        assert_eq!(Protocols::BOTH.to_string(), "tcp+udp");
    }

    #[test]
    fn ipv4_prefixes_equal_octet_patterns() {
        assert_eq!(one("10.0.0.0/8 * : 1").dest, pat("10.*.*.*"));
        assert_eq!(one("10.5.0.0/16 * : 1").dest, pat("10.5.*.*"));
        assert_eq!(one("0.0.0.0/0 * : 1").dest, pat("*.*.*.*"));
        assert_eq!(one("10.1.1.1/32 * : 1").dest, pat("10.1.1.1"));
        let Dest::Pattern(p) = one("192.168.4.0/22 * : 1").dest else {
            panic!()
        };
        assert_eq!(p.octets()[2], OctetRange { lo: 4, hi: 7 });
        assert!(p.matches(ip4([192, 168, 7, 255])));
        assert!(!p.matches(ip4([192, 168, 8, 0])));
        assert!(!p.matches(ip4([192, 168, 3, 255])));
    }

    #[test]
    fn ipv6_addresses_and_prefixes() {
        let r = one("2001:db8::10 443 : 5000");
        let want: IpAddr = "2001:db8::10".parse().unwrap();
        assert_eq!(r.dest, Dest::Pattern(AddrPattern::exact(want)));
        assert_eq!(r.dest_ports, PortRange { lo: 443, hi: 443 }.into());
        let r = one("!2001:db8::/32 *:42000-43000 tcp+udp");
        assert!(r.negated);
        let Dest::Pattern(p) = r.dest else { panic!() };
        assert!(p.is_ipv6());
        assert!(p.matches("2001:db8:ffff::1".parse().unwrap()));
        assert!(!p.matches("2001:db9::1".parse().unwrap()));
        assert!(
            !p.matches(ip4([32, 1, 13, 184])),
            "no IPv4 address in a v6 prefix"
        );
        // Colons inside the address, then the usual `:` separator, any spacing.
        for text in ["::1 80:5", "::1 80 : 5", " ! ::1\t80 :5", "::1 80,81:5 udp"] {
            let r = one(text);
            assert_eq!(
                r.dest,
                Dest::Pattern(AddrPattern::exact("::1".parse().unwrap())),
                "{text}"
            );
        }
        assert_eq!(
            one("::/0 * : 7").dest,
            Dest::Pattern(AddrPattern::V6([OctetRange::ANY; 16]))
        );
    }

    #[test]
    fn v4_mapped_destinations_are_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.1.1".parse().unwrap();
        assert_eq!(canonical(mapped), ip4([10, 1, 1, 1]));
        let Dest::Pattern(p) = one("10.0.0.0/8 * : 1").dest else {
            panic!()
        };
        assert!(p.matches(mapped));
    }

    #[test]
    fn a_tcpoport_ini_parses_as_before() {
        // The original grammar's forms: protocol TCP, one port range each.
        let rules =
            parse("! 10.*.*.*  *:  42000-43000\n10.*.*.*  *:  64000-64100\nhost.domain 21 : 0\n")
                .unwrap();
        assert!(rules.iter().all(|r| r.protocols == Protocols::TCP));
        assert!(rules.iter().all(|r| r.dest_ports.ranges().len() == 1));
        assert!(rules[0].negated && !rules[0].covers_family(true));
        assert!(rules[2].covers_family(true) && rules[2].covers_family(false));
    }

    #[test]
    fn shipped_examples_parse() {
        for text in [
            include_str!("../../../examples/tcpoport.ini"),
            include_str!("../../../examples/connection-paths.ini"),
        ] {
            let rules = parse(text).unwrap_or_else(|e| panic!("{e:?}"));
            assert!(rules.len() >= 6);
        }
        // The README's connection-path table: the second column of each row.
        let readme = include_str!("../../../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| connection path | rule |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| l.split(" | `").nth(1)?.strip_suffix("` |"))
            .collect();
        assert_eq!(rows.len(), 7, "{rows:?}");
        for row in rows {
            parse(row).unwrap_or_else(|e| panic!("{row}: {e:?}"));
        }
    }
}
