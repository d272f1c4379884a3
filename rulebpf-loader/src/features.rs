//! What the running kernel offers that the hooks rely on, probed by loading
//! tiny programs (aya's feature probes) rather than guessed from the version:
//! distribution kernels backport, and a version says nothing about what was
//! configured.
//!
//! `rulebpf kernel` prints the table; loading refuses early, with the missing
//! pieces named, when a needed feature is absent; and where a missing feature
//! has a fallback the loader says what changes (see [`Support::set_retval`]).

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_program_supported},
};

/// One kernel feature the hooks use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// Upstream kernel version that introduced it.
    pub since: &'static str,
    /// What rulebpf does with it.
    pub role: &'static str,
    /// `None` when the probe itself failed (no permission, no BPF at all).
    pub present: Option<bool>,
    /// Whether rulebpf cannot work without it.
    pub required: bool,
}

/// The probed features.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Support {
    pub features: Vec<Feature>,
}

/// Set to `1` to act as if `bpf_set_retval` were missing (tests the
/// fallback on kernels that have it).
pub const ASSUME_NO_SET_RETVAL: &str = "RULEBPF_ASSUME_NO_SET_RETVAL";

impl Support {
    /// The probed support of the running kernel, probed once per process:
    /// the kernel does not change under a running service, and each probe
    /// loads programs.
    pub fn get() -> &'static Self {
        static SUPPORT: std::sync::OnceLock<Support> = std::sync::OnceLock::new();
        SUPPORT.get_or_init(Self::probe)
    }

    fn probe() -> Self {
        let helper = |h| is_helper_supported(ProgramType::CgroupSockAddr, h).ok();
        let mut set_retval = helper(BpfHelper::BPF_FUNC_set_retval);
        if std::env::var_os(ASSUME_NO_SET_RETVAL).is_some_and(|v| v == "1") {
            set_retval = Some(false);
        }
        Self {
            features: vec![
                Feature {
                    name: "cgroup/connect4, cgroup/connect6 programs",
                    since: "4.17",
                    role: "the hooks",
                    present: is_program_supported(ProgramType::CgroupSockAddr).ok(),
                    required: true,
                },
                Feature {
                    name: "bpf_bind",
                    since: "4.17",
                    role: "binds the socket to an origin port",
                    present: helper(BpfHelper::BPF_FUNC_bind),
                    required: true,
                },
                Feature {
                    name: "bpf_loop",
                    since: "5.17",
                    role: "tries every port of a range in one connect()",
                    present: helper(BpfHelper::BPF_FUNC_loop),
                    required: true,
                },
                Feature {
                    name: "bpf_set_retval",
                    since: "5.18",
                    role: "connect() fails with EADDRNOTAVAIL when a range is exhausted \
                           (without it: EPERM)",
                    present: set_retval,
                    required: false,
                },
            ],
        }
    }

    /// Whether the hook may call `bpf_set_retval`.
    pub fn set_retval(&self) -> bool {
        self.features
            .iter()
            .any(|f| f.name == "bpf_set_retval" && f.present == Some(true))
    }

    /// The required features this kernel lacks, as one sentence, if any.
    pub fn missing_required(&self) -> Option<String> {
        let missing: Vec<String> = self
            .features
            .iter()
            .filter(|f| f.required && f.present == Some(false))
            .map(|f| format!("{} (Linux {}: {})", f.name, f.since, f.role))
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "this kernel lacks {}; rulebpf needs Linux 5.17 or later",
                missing.join(", ")
            )
        })
    }

    /// What works differently on this kernel, one line each.
    pub fn degradations(&self) -> Vec<String> {
        if self.set_retval() {
            return Vec::new();
        }
        vec![
            "this kernel cannot set connect()'s errno from BPF (bpf_set_retval, Linux 5.18): \
             with --policy strict an exhausted range fails connect() with EPERM instead of \
             EADDRNOTAVAIL"
                .to_string(),
        ]
    }
}
