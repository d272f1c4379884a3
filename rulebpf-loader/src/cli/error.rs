//! What a command can fail with, and the exit status each failure gives.

use std::io;

use rulebpf_loader::{
    instance::InstanceError,
    integrations::{oci_hook::ContainerError, systemd},
    model::name::NameError,
    ops::probe::EnterError,
    service::ServiceError,
    sys::cgroup::CgroupError,
};
use rulebpf_rules::ruleset::RuleFileError;

/// Everything a command can fail with; [`exit_code`] sorts it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Rules(#[from] RuleFileError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Events(#[from] rulebpf_loader::service::events::EventsError),
    #[error(transparent)]
    Enter(#[from] EnterError),
    #[error("{failed} of {count} connects failed")]
    ProbeFailed { failed: usize, count: usize },
    #[error(
        "internal error: the compiled lookup chose rule {compiled:?}, first match chose \
         {reference:?}; please report"
    )]
    LookupMismatch {
        compiled: Option<u32>,
        reference: Option<usize>,
    },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Oci(#[from] ContainerError),
    #[error(transparent)]
    Guard(#[from] rulebpf_loader::kernel::guard::GuardError),
    #[error(transparent)]
    Unit(#[from] systemd::UnitError),
    #[error(transparent)]
    Dropin(#[from] systemd::DropinError),
    #[error("{0}")]
    Usage(&'static str),
    #[error("reading this host's addresses and ephemeral ports")]
    Addresses(#[source] io::Error),
    /// `explain`'s destination is no address and no name that resolves.
    #[error("{0}")]
    Destination(String),
    #[error("not collected (the rest was):\n{0}")]
    NotCollected(String),
    #[error("starting the service's runtime")]
    Runtime(#[source] io::Error),
    #[error("writing the output")]
    Output(#[from] io::Error),
}

/// Whether `error` comes from the kernel refusing an unprivileged caller.
pub fn lacks_privilege(error: &CliError) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// 2 for what the user gave us (a bad file, a path that is no cgroup),
/// 1 for a failure while acting on valid input.
pub fn exit_code(error: &CliError) -> u8 {
    let bad_cgroup = |e: &CgroupError| e.is_bad_input();
    let bad = match error {
        CliError::Rules(_)
        | CliError::Service(ServiceError::Rules(_))
        | CliError::Name(_)
        | CliError::Instance(InstanceError::Name(_))
        | CliError::Usage(_)
        | CliError::Destination(_)
        | CliError::Unit(_) => true,
        CliError::Oci(ContainerError::Oci(e)) => e.is_bad_input(),
        CliError::Oci(ContainerError::Instance(InstanceError::Cgroup(e))) => bad_cgroup(e),
        CliError::Cgroup(e)
        | CliError::Instance(InstanceError::Cgroup(e))
        | CliError::Service(ServiceError::Instance(InstanceError::Cgroup(e))) => bad_cgroup(e),
        _ => false,
    };
    if bad { 2 } else { 1 }
}
