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
//! * `DEST_IP` may also be `*`: every IPv4 and IPv6 address (`* * : deny
//!   tcp+udp` as the last line makes the file an allow-list).
//! * `ORG_PORTS`: `65001`, `65000-65100`, `0` ("let the OS choose"), or
//!   `deny` (connect() fails with EPERM).
//! * `PROTOCOL`: `tcp`, `udp` or `tcp+udp`, any case; TCP when left out, as in
//!   the original tcpoport.ini.
//! * `!` negates the destination match: the rule matches when the address is
//!   outside the pattern **or** the port is outside the port set. The protocol
//!   and the address family are not negated: `! 10.*.*.*` is about IPv4
//!   destinations only.
//!
//! Blank lines and lines starting with `#` or `;` are ignored; a `#` after a
//! blank on a rule's line starts its remark (`10.1.1.1 22 : 64000 # SFTP`),
//! which reports show beside the rule. Whitespace around
//! the fields is free, but the address and the destination ports must be
//! separated by at least one blank (`10.1.1.1 21`, never `10.1.1.121`). An
//! IPv6 destination (a word with two or more `:`) ends at the first blank.
//!
//! Parsing never stops at the first bad line: [`parse`] returns all errors, one
//! per bad line, each with the 1-based line and the column of the character
//! it is about. A line is split into words (`tokens`), then each field is read
//! by its own parser (`dest`, `ports`).
//!
//! The file itself is bytes ([`parse_bytes`]): a UTF-8 byte-order mark at the
//! start is skipped (editors on Windows write one), a line that is not UTF-8
//! is an error at its first bad byte, and CRLF line ends are accepted. The
//! file's text is echoed in messages escaped and cut short (`shown`).

mod dest;
mod ports;
mod shown;
mod tokens;

use self::{
    dest::parse_dest,
    ports::{blank_in_port_list, parse_origin, parse_port_list, parse_protocols},
    shown::cut,
    tokens::{Piece, Token, split_line, width},
};
use crate::rule::{Protocols, Rule};

/// The UTF-8 encoding of U+FEFF, the byte-order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A malformed line: where it is wrong and why, without the file name
/// (see [`ParseError::in_file`] for the `file:line:col: message` form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: u32,
    /// 1-based column, counted in characters.
    pub col: u32,
    /// What is wrong; the file's text in it is escaped (never a raw control
    /// character) and cut short.
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
    let (rules, errors) = parse_all(text);
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

/// The rules of every good line and the errors of every bad one: a file
/// with errors is never used, but its good lines can still be checked
/// further (their DNS names, say) so that one run reports everything.
pub fn parse_all(text: &str) -> (Vec<Rule>, Vec<ParseError>) {
    parse_bytes(text.as_bytes())
}

/// [`parse_all`] on the file's bytes: a leading byte-order mark is skipped,
/// and each line that is not UTF-8 is an error at its first bad byte.
pub fn parse_bytes(file: &[u8]) -> (Vec<Rule>, Vec<ParseError>) {
    let file = file.strip_prefix(BOM).unwrap_or(file);
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for (index, bytes) in file.split(|&b| b == b'\n').enumerate() {
        let line = u32::try_from(index + 1).unwrap_or(u32::MAX);
        // CRLF: the CR is part of the line end, as `str::lines` has it.
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let parsed = match std::str::from_utf8(bytes) {
            Ok(text) => parse_line(text),
            Err(error) => Err(not_utf8(bytes, error)),
        };
        match parsed {
            Ok(Some(mut rule)) => {
                rule.line = line;
                rules.push(rule);
            }
            Ok(None) => {}
            Err(LineError { col, message }) => errors.push(ParseError { line, col, message }),
        }
    }
    (rules, errors)
}

/// The error of a line that is not UTF-8, at its first bad byte.
fn not_utf8(bytes: &[u8], error: std::str::Utf8Error) -> LineError {
    let (good, bad) = bytes.split_at(error.valid_up_to());
    // `good` is the longest valid prefix, so this cannot fail.
    let col = std::str::from_utf8(good).map_or(1, |text| width(text).saturating_add(1));
    LineError::new(
        col,
        format!(
            "not UTF-8 text (byte 0x{:02x}); save the file as UTF-8",
            bad[0]
        ),
    )
}

/// What is wrong with one line; [`parse`] adds the line number.
struct LineError {
    col: u32,
    message: String,
}

impl LineError {
    /// The one way a line error is made: its message is escaped here, so
    /// no message can carry a raw control character of the file.
    fn new(col: u32, message: impl AsRef<str>) -> Self {
        Self {
            col,
            message: shown::escaped(message.as_ref()),
        }
    }
}

fn err<T>(col: u32, message: impl AsRef<str>) -> Result<T, LineError> {
    Err(LineError::new(col, message))
}

fn parse_line(line: &str) -> Result<Option<Rule>, LineError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
        return Ok(None);
    }
    // The rule is a prefix of the line: columns stay the line's.
    let (line, remark) = split_remark(line);
    let trimmed = line.trim();
    let end_col = width(line.trim_end()).saturating_add(1);
    let mut pieces = split_line(line).into_iter();

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
                col: token.col.saturating_add(1),
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
    if let Some(error) = blank_in_port_list(ports_token, pieces.clone()) {
        return Err(error);
    }
    let dest_ports = parse_port_list(ports_token)?;

    match pieces.next() {
        Some(Piece::Colon(_)) => {}
        Some(Piece::Word(token)) => {
            return err(
                token.col,
                format!(
                    "expected `:` between destination ports and origin ports, found `{}`",
                    cut(token.text)
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
            Piece::Word(token) => (token.col, format!("`{}`", cut(token.text))),
            Piece::Colon(col) => (col, "`:`".to_string()),
        };
        return err(col, format!("unexpected {what} after the protocol"));
    }

    Ok(Some(Rule {
        line: 0,
        text: trimmed.to_string(),
        remark,
        negated,
        dest,
        dest_ports,
        origin,
        protocols,
    }))
}

/// A line's rule and its remark: a `#` after a blank starts the remark,
/// which runs to the end of the line. (A `#` inside a field is no remark,
/// and stays the error it always was.)
fn split_remark(line: &str) -> (&str, Option<String>) {
    let hash = line
        .char_indices()
        .zip(line.chars().skip(1))
        .find(|&((_, before), hash)| before.is_whitespace() && hash == '#')
        .map(|((i, before), _)| i + before.len_utf8());
    match hash {
        Some(i) => {
            let remark = line[i + 1..].trim();
            (&line[..i], (!remark.is_empty()).then(|| remark.to_string()))
        }
        None => (line, None),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use rulebpf_common::Family;

    use super::*;
    use crate::rule::{AddrPattern, Dest, OctetRange, Origin, PortRange, PortSet, canonical};

    fn one(text: &str) -> Rule {
        let mut rules = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e:?}"));
        assert_eq!(rules.len(), 1, "{text:?}");
        rules.remove(0)
    }

    #[test]
    fn deny_star_and_remarks() {
        let r = one("10.0.0.0/8 * : deny tcp+udp");
        assert_eq!((r.origin, r.protocols), (Origin::Deny, Protocols::BOTH));
        assert_eq!(one("* * : DENY").origin, Origin::Deny);
        let r = one("* * : 0");
        assert_eq!(r.dest, Dest::Any);
        assert!(r.covers_family(Family::Ipv4) && r.covers_family(Family::Ipv6));
        let r = one("10.1.1.1 22 : 64000-64099   # SFTP to the partner ");
        assert_eq!(r.remark.as_deref(), Some("SFTP to the partner"));
        // The remark is not the rule: the same rule, the same identity.
        assert_eq!(r.text, "10.1.1.1 22 : 64000-64099");
        assert_eq!(one("10.1.1.1 22 : 1 tcp	#").remark, None);
        // A `#` inside a field is no remark, and an error as before.
        assert_eq!(error("10.1.1.1 22 : 1#x").1, 15);
        // Errors keep their columns before a remark.
        assert_eq!(error("10.1.1.300 22 : 1 # why").1, 8);
        assert_eq!(
            error("* * : denied").2,
            "origin `denied`: a port, a range like 65000-65100, 0 (the OS chooses) or deny"
        );
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
    fn a_port_list_with_blanks_says_how_to_write_it() {
        assert_eq!(
            error("10.1.1.1 80, 81 : 5"),
            (1, 13, "a port list has no blanks: write `80,81`".into())
        );
        // Blanks on either side of the commas; the column is the first blank.
        assert_eq!(
            error("# gateway\n2001:db8::1 389 ,636, 3268-3269 : 5 udp"),
            (
                2,
                16,
                "a port list has no blanks: write `389,636,3268-3269`".into()
            )
        );
    }

    #[test]
    fn an_ipv6_address_in_brackets_says_to_drop_them() {
        assert_eq!(
            error("[::1] 80 : 5"),
            (1, 1, "write an IPv6 address without brackets: `::1`".into())
        );
        assert_eq!(
            error("! [2001:db8::]/32 * : 5"),
            (
                1,
                3,
                "write an IPv6 address without brackets: `2001:db8::/32`".into()
            )
        );
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
    fn a_two_megabyte_port_list_parses_in_linear_time() {
        // One column per list entry used to rescan the list from its start:
        // quadratic (a 1 MB line took seconds). Columns are now carried
        // forward; the meter counts every byte scanned to compute them.
        let entries = 1_000_000;
        let line = format!("1.2.3.4 {}x : 5", "1,".repeat(entries));
        tokens::SCANNED.with(|scanned| scanned.set(0));
        let (line_no, col, message) = error(&line);
        let scanned = tokens::SCANNED.with(|scanned| scanned.get());
        assert_eq!((line_no, col), (1, 9 + 2 * entries as u32), "{message}");
        assert_eq!(
            message,
            "bad destination port `x`: expected a number 0-65535"
        );
        assert!(
            scanned <= 2 * line.len(),
            "{scanned} bytes scanned for a {} byte line",
            line.len()
        );
        // The same for a good line, and for the long-line errors of the
        // other splitting fields.
        tokens::SCANNED.with(|scanned| scanned.set(0));
        let good = format!("1.2.3.4 {}1 : 5", "1,".repeat(entries));
        assert_eq!(
            one(&good).dest_ports.normalized(),
            [PortRange { lo: 1, hi: 1 }]
        );
        assert!(tokens::SCANNED.with(|scanned| scanned.get()) <= 2 * good.len());
    }

    #[test]
    fn a_long_word_is_cut_short_in_its_message() {
        let (_, col, message) = error(&format!("1.2.3.4 {} : 5", "9".repeat(100_000)));
        assert_eq!(col, 9);
        assert_eq!(
            message,
            format!(
                "destination port `{}…` is larger than 65535",
                "9".repeat(40)
            )
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_an_error_at_its_first_bad_byte() {
        // Line 2: `é` is two bytes, one column; 0xff is the 11th character.
        let file = b"1.2.3.4 * : 5\n# caf\xc3\xa9 \xff\xfe\n1.2.3 * : 5\n1.2.3.4 * : 6\n";
        let (rules, errors) = parse_bytes(file);
        assert_eq!(rules.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 4]);
        let shown: Vec<String> = errors.iter().map(|e| e.in_file("t.ini")).collect();
        assert_eq!(
            shown,
            [
                "t.ini:2:8: not UTF-8 text (byte 0xff); save the file as UTF-8",
                "t.ini:3:1: an IPv4 address or pattern has 4 octets, `1.2.3` has 3",
            ]
        );
        // A truncated sequence at the end of a line.
        let (_, errors) = parse_bytes(b"1.2.3.4 * : 5 \xe2\x82");
        assert_eq!((errors[0].line, errors[0].col), (1, 15));
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_crlf_accepted() {
        let file = "\u{feff}10.1.1.1 21 : 65001\r\n\r\n1.2.3.4 * : 5 udp\r\n";
        let (rules, errors) = parse_bytes(file.as_bytes());
        assert_eq!(errors, []);
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].text, "10.1.1.1 21 : 65001");
        assert_eq!(rules[1].line, 3);
        assert_eq!(rules[1].protocols, Protocols::UDP);
        // Columns on line 1 do not count the mark.
        assert_eq!(error("\u{feff}1.2.3.4 x : 5").1, 9);
        // Anywhere else it is a character like any other, shown escaped.
        let (_, col, message) = error("1.2.3.4 * : 5\n\u{feff}1.2.3.4 * : 5");
        assert_eq!(col, 1);
        assert!(message.contains(r"`\u{feff}1.2.3.4`"), "{message}");
    }

    #[test]
    fn control_characters_are_escaped_in_messages() {
        for (text, shown) in [
            ("1.2.3.4 1\0 : 5", r"bad destination port `1\0`"),
            (
                "bad\u{1b}[2J.example * : 5",
                r"unexpected character `\u{1b}`",
            ),
            ("1.2.3.4 * : 5 udp\u{7f}", r"unknown protocol `udp\u{7f}`"),
        ] {
            let (_, _, message) = error(text);
            assert!(message.contains(shown), "{text:?}: {message}");
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
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
        assert_eq!(p.family(), Family::Ipv6);
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
        assert!(rules[0].negated && !rules[0].covers_family(Family::Ipv6));
        assert!(rules[2].covers_family(Family::Ipv6) && rules[2].covers_family(Family::Ipv4));
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
