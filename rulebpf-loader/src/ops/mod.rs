//! The use cases the command line and the service share, each on the
//! instance API: putting rules in force, detaching, collecting garbage, status and counters, and the probe client.

pub mod detach;
pub mod gc;
pub mod probe;
pub mod put_in_force;
pub mod status;
