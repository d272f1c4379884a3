//! Reading libtest's summary lines, which every test binary prints once:
//!
//! ```text
//! test result: ok. 31 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s
//! ```
//!
//! `ci` sums them over the host's `cargo test` output, `vm-test` over each
//! guest's console.

use std::ops::AddAssign;

/// Passed and failed tests, summed over summary lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u32,
    pub failed: u32,
}

impl Counts {
    /// The counts of one `test result:` line; `None` for any other line.
    pub fn of_line(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("test result: ")?;
        let count = |what: &str| {
            rest.split(';')
                .find_map(|part| part.trim().strip_suffix(what))
                .and_then(|n| n.split_whitespace().last()?.parse::<u32>().ok())
                .unwrap_or(0)
        };
        Some(Self {
            passed: count(" passed"),
            failed: count(" failed"),
        })
    }

    /// The sum over every summary line of `lines`.
    pub fn sum<'a>(lines: impl IntoIterator<Item = &'a str>) -> Self {
        let mut total = Self::default();
        for counts in lines.into_iter().filter_map(Self::of_line) {
            total += counts;
        }
        total
    }
}

impl AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        self.passed += other.passed;
        self.failed += other.failed;
    }
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn sums_summary_lines_only() {
        let log = "running 3 tests\n\
                   test a ... ok\n\
                   test result: ok. 31 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s\n\
                   test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
                   not a test result: 9 passed; 9 failed\n";
        assert_eq!(
            Counts::sum(log.lines()),
            Counts {
                passed: 33,
                failed: 1
            }
        );
        assert_eq!(Counts::of_line("test foo ... ok"), None);
    }
}
