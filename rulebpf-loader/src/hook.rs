//! The two hooks of a rule set, `cgroup/connect4` and `cgroup/connect6`, and
//! [`PerHook`]: one value for each (programs, links, program ids), so that
//! what belongs to a hook travels as a pair rather than as `x` beside
//! `connect6_x`.

use aya::programs::CgroupSockAddrAttachType;
use serde::{Deserialize, Serialize};

/// One of the two hooks. Both programs of a rule set share its maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
}

impl Hook {
    pub const ALL: [Self; 2] = [Self::Connect4, Self::Connect6];

    /// The program's name in the object file.
    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Connect4 => rulebpf_common::PROGRAM_CONNECT4,
            Self::Connect6 => rulebpf_common::PROGRAM_CONNECT6,
        }
    }

    /// Short name, used for pins and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
        }
    }

    pub const fn attach_type(self) -> CgroupSockAddrAttachType {
        match self {
            Self::Connect4 => CgroupSockAddrAttachType::Connect4,
            Self::Connect6 => CgroupSockAddrAttachType::Connect6,
        }
    }
}

/// A value for each hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerHook<T> {
    pub connect4: T,
    pub connect6: T,
}

impl<T> PerHook<T> {
    pub fn get(&self, hook: Hook) -> &T {
        match hook {
            Hook::Connect4 => &self.connect4,
            Hook::Connect6 => &self.connect6,
        }
    }

    /// Each hook with its value.
    pub fn into_pairs(self) -> [(Hook, T); 2] {
        [
            (Hook::Connect4, self.connect4),
            (Hook::Connect6, self.connect6),
        ]
    }

    /// Builds a pair hook by hook, stopping at the first error.
    pub fn try_from_fn<E>(mut f: impl FnMut(Hook) -> Result<T, E>) -> Result<Self, E> {
        Ok(Self {
            connect4: f(Hook::Connect4)?,
            connect6: f(Hook::Connect6)?,
        })
    }
}
