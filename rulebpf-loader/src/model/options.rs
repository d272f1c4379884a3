//! The options an instance's rule sets are loaded with: what `attach` and
//! `run` take on the command line, and what the records keep.

use serde::{Deserialize, Serialize};

/// What the hook does when no port of a rule's range is free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// connect() fails with EADDRNOTAVAIL.
    #[default]
    Strict,
    /// The OS chooses the port, as if no rule matched.
    Fallback,
}

/// Whether an origin port carries one socket per destination (the kernel's
/// own connect() allocator does so) or one socket in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// `SO_REUSEADDR` (TCP) / `SO_REUSEPORT` (UDP) and the instance's tuple
    /// table: a port is busy only toward the destinations it is connected to.
    #[default]
    On,
    /// One socket per origin port, as `bind()` before `connect()` in the
    /// application.
    Off,
}

/// What happens to a socket the application bound itself, outside the
/// matching rule's range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppBound {
    /// It keeps its port (counted, logged at info).
    #[default]
    Keep,
    /// connect() fails with EPERM (logged at warn, naming the rule).
    Refuse,
}

/// How to load a rule set's object.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub policy: Policy,
    /// Most verbose kernel log level compiled in (`Off` for `attach`, where no
    /// one reads the log: each log call then costs one branch).
    pub kernel_log: log::LevelFilter,
    pub sharing: Sharing,
    pub app_bound: AppBound,
}
