//! What the kernel tests, `cargo xtask bench` and `cargo xtask demo` stand on.
//!
//! rulebpf's claims are about the origin port a *peer* sees, so every check
//! of the real thing ends at a listener that writes down the peer port of
//! each connection: [`Listener`]. The origin ports those checks configure
//! must not collide with each other nor with the ports the OS picks itself:
//! [`ports`] is the one table of who uses which range; [`cgroup`] cleans up
//! the cgroups they made.
//!
//! Plain `std`, no eBPF build, no dependencies: the bench and the demo
//! (xtask) link it without building the hook, and its unit tests run
//! anywhere there is a loopback interface.

pub mod cgroup;
pub mod listener;
pub mod ports;

pub use listener::{Listener, Mode};
pub use ports::PortSlot;
