//! Kernel integration tests: rules attached to a real cgroup, connections
//! made by a real process in it, and the **peer port the listener saw** as
//! the assertion. Each test owns its cgroup, its listener port and its
//! origin ranges (outside the OS ephemeral range; the table is
//! `rulebpf_testkit::ports`), so tests run in parallel.

mod agent;
mod cli;
mod commands;
mod containers;
mod enforcement;
mod events;
mod families;
mod faults;
mod firewall;
mod guard;
mod hardening;
mod harness;
mod instances;
mod nat;
mod paths;
mod search;
mod service;
mod sharing;
