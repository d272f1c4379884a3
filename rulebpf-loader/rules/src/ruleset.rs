//! A rule file made ready for the kernel: read, parsed, names resolved,
//! compiled. Nothing here touches the kernel, so `check` and `explain` use it
//! as they are, and `attach` only proceeds once it succeeded as a whole.
//!
//! The file is not trusted: [`LoadLimits`] bounds what reading it
//! (`crate::file`: regular files only, a size limit) and compiling it
//! ([`Budget`]) may cost.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    compile::{self, Budget, CompileError, Compiled},
    file::{self, FileError},
    grammar::{self, ParseError},
    resolve::{self, NameFailure, Names},
    rule::{Dest, Origin, Rule},
};

/// What loading one rule file may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadLimits {
    /// The largest file read, in bytes (`--max-file-size`).
    pub max_file_bytes: u64,
    /// What compiling it may cost (`--max-kernel-memory`).
    pub compile: Budget,
}

/// 128 MiB: 1,000,000 rules of a realistic 40 to 64 bytes a line
/// (`dc1.corp.example 389,636,3268-3269 : 41300-41399`, an IPv6 address,
/// a comment now and then) are 40-64 MB; twice that leaves room for long
/// names and comments, and reading it is a fraction of a second.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 128 << 20;

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            compile: Budget::default(),
        }
    }
}

/// A rule file that compiled.
#[derive(Debug)]
pub struct RuleSet {
    pub path: PathBuf,
    pub rules: Vec<Rule>,
    pub names: Names,
    /// Names that did not resolve: their rules match nothing.
    pub name_failures: Vec<NameFailure>,
    /// Names that did not resolve now but kept their last good answer
    /// (see [`RuleSet::load_keeping`]).
    pub stale_names: Vec<NameFailure>,
    pub compiled: Compiled,
    pub compile_time: Duration,
}

/// Why a rule file cannot be used. Always the user's input, never the kernel.
///
/// The underlying error is part of the message, not a `source()`: a report
/// that prints the chain shows it once.
#[derive(Debug, thiserror::Error)]
pub enum RuleFileError {
    /// The file could not be read, or is no regular file, or is too large.
    #[error(transparent)]
    File(#[from] FileError),
    /// Every malformed line, one `file:line:col: message` per line, then
    /// a warning for each good line whose name did not resolve.
    #[error("{}", in_file(path, errors, unresolved))]
    Parse {
        path: PathBuf,
        errors: Vec<ParseError>,
        unresolved: Vec<UnresolvedRule>,
    },
    #[error("{}: {error}", path.display())]
    Compile { path: PathBuf, error: CompileError },
}

fn in_file(path: &Path, errors: &[ParseError], unresolved: &[UnresolvedRule]) -> String {
    let file = path.display().to_string();
    let errors = errors.iter().map(|e| e.in_file(&file));
    let warnings = unresolved.iter().map(|u| u.warning(&file));
    errors.chain(warnings).collect::<Vec<_>>().join("\n")
}

/// A file whose last decision denies everything ([`RuleSet::allow_list`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowList {
    /// The line of the rule that denies everything.
    pub line: u32,
    /// Rules above it that allow a path (not `deny`).
    pub allowed: usize,
}

/// A rule whose DNS name did not resolve: it matches nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnresolvedRule {
    pub line: u32,
    pub name: String,
    pub reason: String,
}

impl UnresolvedRule {
    /// `warning: FILE:LINE: `NAME` did not resolve (REASON); ...`
    pub fn warning(&self, file: &str) -> String {
        format!(
            "warning: {file}:{}: `{}` did not resolve ({}); this rule matches nothing",
            self.line, self.name, self.reason
        )
    }
}

/// The rules whose name is among `failures`, in file order.
fn unresolved_rules(rules: &[Rule], failures: &[NameFailure]) -> Vec<UnresolvedRule> {
    rules
        .iter()
        .filter_map(|rule| {
            let Dest::Name(name) = &rule.dest else {
                return None;
            };
            let failure = failures.iter().find(|f| &f.name == name)?;
            Some(UnresolvedRule {
                line: rule.line,
                name: name.clone(),
                reason: failure.reason.clone(),
            })
        })
        .collect()
}

impl RuleSet {
    /// The rules whose name did not resolve (they match nothing).
    pub fn unresolved_rules(&self) -> Vec<UnresolvedRule> {
        unresolved_rules(&self.rules, &self.name_failures)
    }

    /// Reads, parses, resolves and compiles `path` within the default
    /// [`LoadLimits`].
    pub fn load(path: &Path) -> Result<Self, RuleFileError> {
        Self::load_within(path, &Names::new(), &LoadLimits::default())
    }

    /// Like [`RuleSet::load`], but a name that fails to resolve keeps its
    /// answer from `last_good` (the service's reloads).
    pub fn load_keeping(path: &Path, last_good: &Names) -> Result<Self, RuleFileError> {
        Self::load_within(path, last_good, &LoadLimits::default())
    }

    /// [`RuleSet::load_keeping`] within `limits`.
    pub fn load_within(
        path: &Path,
        last_good: &Names,
        limits: &LoadLimits,
    ) -> Result<Self, RuleFileError> {
        let bytes = file::read(path, limits.max_file_bytes)?;
        let (rules, errors) = grammar::parse_bytes(&bytes);
        drop(bytes);
        if !errors.is_empty() {
            // The good lines' names are looked up too, so that one run
            // reports everything that is wrong with the file.
            let (_, failures) = resolve::resolve_all(&resolve::names_in(&rules));
            return Err(RuleFileError::Parse {
                path: path.to_path_buf(),
                errors,
                unresolved: unresolved_rules(&rules, &failures),
            });
        }
        let answers = resolve::refresh(&rules, last_good);
        Self::with_answers(path, rules, answers, limits)
    }

    /// When the file ends its decisions with a rule that denies everything
    /// (an allow-list): that rule's line and how many paths the rules
    /// above it allow.
    pub fn allow_list(&self) -> Option<AllowList> {
        let last = self.rules.iter().position(Rule::denies_everything)?;
        Some(AllowList {
            line: self.rules[last].line,
            allowed: self.rules[..last]
                .iter()
                .filter(|r| r.origin != Origin::Deny)
                .count(),
        })
    }

    /// Compiles parsed rules with a resolution round's answers
    /// ([`resolve::refresh`]) within `limits`: the service's DNS refresh.
    pub fn with_answers(
        path: &Path,
        rules: Vec<Rule>,
        answers: resolve::Answers,
        limits: &LoadLimits,
    ) -> Result<Self, RuleFileError> {
        let mut set =
            Self::from_parts_within(path, rules, answers.names, answers.unresolved, limits)?;
        set.stale_names = answers.stale;
        Ok(set)
    }

    /// Compiles already parsed rules with already resolved names, within
    /// the default [`LoadLimits`].
    pub fn from_parts(
        path: &Path,
        rules: Vec<Rule>,
        names: Names,
        name_failures: Vec<NameFailure>,
    ) -> Result<Self, RuleFileError> {
        Self::from_parts_within(path, rules, names, name_failures, &LoadLimits::default())
    }

    /// [`RuleSet::from_parts`] within `limits` (the service's DNS refreshes:
    /// new answers can make a set larger).
    pub fn from_parts_within(
        path: &Path,
        rules: Vec<Rule>,
        names: Names,
        name_failures: Vec<NameFailure>,
        limits: &LoadLimits,
    ) -> Result<Self, RuleFileError> {
        let start = Instant::now();
        let compiled =
            compile::compile_within(&rules, &names, limits.compile).map_err(|error| {
                RuleFileError::Compile {
                    path: path.to_path_buf(),
                    error,
                }
            })?;
        Ok(Self {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            rules,
            names,
            name_failures,
            stale_names: Vec::new(),
            compiled,
            compile_time: start.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_show_one_file_line_col_per_line() {
        let errors = grammar::parse("1.2.3 * : 5\n1.2.3.4 * 5\n").unwrap_err();
        let error = RuleFileError::Parse {
            path: "t.ini".into(),
            errors,
            unresolved: vec![],
        };
        let shown = error.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 2, "{shown}");
        assert!(lines[0].starts_with("t.ini:1:1: "), "{shown}");
        assert!(lines[1].starts_with("t.ini:2:11: "), "{shown}");
    }

    #[test]
    fn a_compile_error_names_the_file_and_the_limit() {
        let error = RuleFileError::Compile {
            path: "t.ini".into(),
            error: CompileError::KernelMemory {
                limit: 256 << 20,
                culprits: compile::Culprits::default(),
            },
        };
        assert_eq!(
            error.to_string(),
            "t.ini: rule set too large: its lookup maps would need more than 256 MiB \
             of kernel memory (the limit, --max-kernel-memory)"
        );
    }

    #[test]
    fn loading_keeps_within_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.ini");
        std::fs::write(&path, "\u{feff}1.2.3.4 * : 5\r\n*.1.*.* 80 : 6\r\n").unwrap();
        let set = RuleSet::load(&path).unwrap();
        assert_eq!(set.rules.len(), 2);
        let small = LoadLimits {
            max_file_bytes: 10,
            ..LoadLimits::default()
        };
        let error = RuleSet::load_within(&path, &Names::new(), &small).unwrap_err();
        assert!(
            matches!(
                error,
                RuleFileError::File(FileError::TooLarge {
                    size: 34,
                    limit: 10,
                    ..
                })
            ),
            "{error}"
        );
        let tight = LoadLimits {
            compile: Budget {
                max_kernel_bytes: 1024,
                ..Budget::default()
            },
            ..LoadLimits::default()
        };
        let error = RuleSet::load_within(&path, &Names::new(), &tight).unwrap_err();
        let RuleFileError::Compile { error, .. } = error else {
            panic!("{error}")
        };
        assert!(
            matches!(error, CompileError::KernelMemory { limit: 1024, .. }),
            "{error}"
        );
    }

    #[test]
    fn a_file_with_errors_also_reports_its_unresolvable_names() {
        let path =
            std::env::temp_dir().join(format!("rulebpf-unresolved-{}.ini", std::process::id()));
        std::fs::write(&path, "no-such-host.invalid * : 5\n1.2.3 * : 5\n").unwrap();
        let error = RuleSet::load(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let shown = error.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 2, "{shown}");
        assert!(lines[0].contains(":2:1: "), "{shown}");
        assert!(
            lines[1].starts_with("warning: ")
                && lines[1].contains(":1: `no-such-host.invalid` did not resolve"),
            "{shown}"
        );
    }
}
