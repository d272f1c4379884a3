//! A rule file made ready for the kernel: read, parsed, names resolved,
//! compiled. Nothing here touches the kernel, so `check` and `explain` use it
//! as they are, and `attach` only proceeds once it succeeded as a whole.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    compile::{self, CompileError, Compiled, Names},
    resolve::{self, NameFailure},
    grammar::{self, Dest, ParseError, Rule, canonical},
};

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
#[derive(Debug)]
pub enum RuleFileError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    Parse {
        path: PathBuf,
        errors: Vec<ParseError>,
    },
    Compile {
        path: PathBuf,
        error: CompileError,
    },
}

impl fmt::Display for RuleFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, error } => write!(f, "{}: {error}", path.display()),
            Self::Parse { path, errors } => {
                let file = path.display().to_string();
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    f.write_str(&e.in_file(&file))?;
                }
                Ok(())
            }
            Self::Compile { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for RuleFileError {}

impl RuleSet {
    /// Reads, parses, resolves and compiles `path`.
    pub fn load(path: &Path) -> Result<Self, RuleFileError> {
        Self::load_keeping(path, &Names::new())
    }

    /// Like [`RuleSet::load`], but a name that fails to resolve keeps its
    /// answer from `last_good` (the service's reloads).
    pub fn load_keeping(path: &Path, last_good: &Names) -> Result<Self, RuleFileError> {
        let text = std::fs::read_to_string(path).map_err(|error| RuleFileError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let rules = grammar::parse(&text).map_err(|errors| RuleFileError::Parse {
            path: path.to_path_buf(),
            errors,
        })?;
        let (fresh, failures) = resolve::resolve_all(&resolve::names_in(&rules));
        let answers = resolve::keep_last_good(fresh, failures, last_good);
        let mut set = Self::from_parts(path, rules, answers.names, answers.unresolved)?;
        set.stale_names = answers.stale;
        Ok(set)
    }

    /// Compiles already parsed rules with already resolved names.
    pub fn from_parts(
        path: &Path,
        rules: Vec<Rule>,
        names: Names,
        name_failures: Vec<NameFailure>,
    ) -> Result<Self, RuleFileError> {
        let start = Instant::now();
        let compiled =
            compile::compile(&rules, &names).map_err(|error| RuleFileError::Compile {
                path: path.to_path_buf(),
                error,
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

    /// The reference answer (first match, read straight from the rules): the
    /// index of the rule deciding a connect() to `addr:port` on a TCP (or,
    /// with `udp`, UDP) socket. Rules whose name has no address are skipped.
    pub fn first_match(&self, udp: bool, addr: IpAddr, port: u16) -> Option<usize> {
        let addr = canonical(addr);
        let candidates: Vec<(usize, &Rule)> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.protocols.covers(udp) && rule.covers_family(addr.is_ipv6()))
            .filter(|(_, rule)| match &rule.dest {
                Dest::Name(name) => compile::addresses(&self.names, name).is_some(),
                Dest::Pattern(_) => true,
            })
            .collect();
        grammar::first_match(
            &candidates,
            port,
            |(_, rule)| match &rule.dest {
                Dest::Pattern(p) => p.matches(addr),
                Dest::Name(name) => self
                    .names
                    .get(name)
                    .is_some_and(|a| a.iter().any(|&a| canonical(a) == addr)),
            },
            |(_, rule)| rule,
        )
        .map(|(i, _)| *i)
    }
}
