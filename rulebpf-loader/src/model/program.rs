//! The program kinds of an instance: the two hooks of a rule set
//! (`cgroup/connect4`, `cgroup/connect6`) and the bookkeeping programs
//! attached beside them ([`Tracker`]); [`PerHook`] and [`PerTracker`] hold
//! one value for each, so that what belongs to a program travels with it
//! rather than as `x` beside `connect6_x`; [`ProgramKind`] is any of them,
//! for what treats every kind alike (attach, detach, query).

use serde::{Deserialize, Serialize};

/// One of the two hooks. Both programs of a rule set share its maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
}

impl Hook {
    pub const ALL: [Self; 2] = [Self::Connect4, Self::Connect6];

    /// Short name, used for pins and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
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

/// The bookkeeping programs of an instance: they keep the instance maps
/// true for every cgroup the entry programs are attached to, whatever rule
/// set is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracker {
    /// `cgroup/bind4`: writes down who chose the port of a socket the
    /// application binds (the application, or the kernel for port 0).
    Bind4,
    /// `cgroup/bind6`: the same for IPv6 sockets.
    Bind6,
    /// `cgroup/sock_release`: gives back a released socket's tuple and its
    /// place in its rule's occupancy.
    SockRelease,
    /// `sockops`: gives back a TCP connection's tuple when the connection
    /// is closed, which comes after its socket's release when it closes
    /// first.
    SockOps,
}

impl Tracker {
    /// In attach order: the release bookkeeping is in place before any
    /// connect is hooked.
    pub const ALL: [Self; 4] = [Self::SockRelease, Self::SockOps, Self::Bind4, Self::Bind6];

    /// Short name, used for pins (program and link) and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bind4 => "bind4",
            Self::Bind6 => "bind6",
            Self::SockRelease => "sock_release",
            Self::SockOps => "sock_ops",
        }
    }

    /// The program's name in the entry object file.
    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Bind4 => rulebpf_common::PROGRAM_BIND4,
            Self::Bind6 => rulebpf_common::PROGRAM_BIND6,
            Self::SockRelease => rulebpf_common::PROGRAM_RELEASE,
            Self::SockOps => rulebpf_common::PROGRAM_SOCKOPS,
        }
    }
}

/// A value for each [`Tracker`] (a record without one reads its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerTracker<T: Default> {
    #[serde(default)]
    pub bind4: T,
    #[serde(default)]
    pub bind6: T,
    #[serde(default)]
    pub sock_release: T,
    #[serde(default)]
    pub sock_ops: T,
}

impl<T: Default> PerTracker<T> {
    pub fn get(&self, tracker: Tracker) -> &T {
        match tracker {
            Tracker::Bind4 => &self.bind4,
            Tracker::Bind6 => &self.bind6,
            Tracker::SockRelease => &self.sock_release,
            Tracker::SockOps => &self.sock_ops,
        }
    }

    /// Builds the four values tracker by tracker (in attach order),
    /// stopping at the first error.
    pub fn try_from_fn<E>(mut f: impl FnMut(Tracker) -> Result<T, E>) -> Result<Self, E> {
        Ok(Self {
            sock_release: f(Tracker::SockRelease)?,
            sock_ops: f(Tracker::SockOps)?,
            bind4: f(Tracker::Bind4)?,
            bind6: f(Tracker::Bind6)?,
        })
    }
}

/// Any program an instance attaches to a cgroup: an entry program of a
/// hook, or a bookkeeping program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    Hook(Hook),
    Tracker(Tracker),
}

impl ProgramKind {
    /// Every kind, in attach order: the bookkeeping first, so that every
    /// socket the hooks bind is released against the instance maps.
    pub const ALL: [Self; 6] = [
        Self::Tracker(Tracker::SockRelease),
        Self::Tracker(Tracker::SockOps),
        Self::Tracker(Tracker::Bind4),
        Self::Tracker(Tracker::Bind6),
        Self::Hook(Hook::Connect4),
        Self::Hook(Hook::Connect6),
    ];

    /// Short name, used for pins (program and link) and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hook(hook) => hook.name(),
            Self::Tracker(tracker) => tracker.name(),
        }
    }
}

impl From<Hook> for ProgramKind {
    fn from(hook: Hook) -> Self {
        Self::Hook(hook)
    }
}

impl From<Tracker> for ProgramKind {
    fn from(tracker: Tracker) -> Self {
        Self::Tracker(tracker)
    }
}
