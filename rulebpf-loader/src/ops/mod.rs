//! The use cases the command line and the service share, each on the
//! instance API: detaching, collecting garbage, status and counters, and the probe client.

pub mod detach;
pub mod gc;
pub mod probe;
pub mod status;
