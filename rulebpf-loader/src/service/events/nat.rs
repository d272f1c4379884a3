//! `nat_port`: the origin port a connection left the host with, when
//! source NAT rewrote the one the hook bound.
//!
//! Nothing is added to the packet path. The kernel's connection tracking
//! already holds the answer: a connection's original tuple has the bound
//! port, its reply tuple the port NAT chose (`sys::conntrack`). NAT runs
//! in POSTROUTING, before the packet leaves, and the entry is confirmed
//! with the first packet, so the reader looks it up a moment after the
//! connect ([`LOOK_AFTER`]). It looks in the socket's network namespace
//! and in its own (where a bridge's masquerade happens for containers,
//! as netavark's does), and only where `nft` shows a `snat`/`masquerade`
//! rule: without NAT rules, events pass straight through.
//! https://github.com/torvalds/linux/blob/v6.12/net/ipv4/ip_output.c (ip_output: NF_INET_POST_ROUTING)

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    net::SocketAddr,
    time::{Duration, Instant},
};

use log::debug;
use rulebpf_common::Event;

use crate::{
    model::event::DecisionRecord,
    sys::{
        conntrack::{Conntrack, Entry, own_netns_cookie},
        nat::nat_rules_in,
    },
};

/// How long after the connect its conntrack entry is looked for.
pub const LOOK_AFTER: Duration = Duration::from_millis(250);
/// Given up after this long (the connection never sent a packet).
const GIVE_UP: Duration = Duration::from_millis(1500);
/// How long a namespace's "has NAT rules" answer is trusted.
const RECHECK: Duration = Duration::from_secs(10);

/// One network namespace: whether it has source NAT, and its table.
struct Space {
    nat: bool,
    checked: Instant,
    conntrack: Option<Conntrack>,
}

impl Space {
    fn check(netns: Option<&File>) -> bool {
        nat_rules_in(netns).is_ok_and(|rules| !rules.is_empty())
    }
}

struct Pending {
    at: Instant,
    record: DecisionRecord,
    /// The namespaces to look in (cookies); empty: passes through.
    spaces: Vec<u64>,
}

/// Holds records whose connection NAT could rewrite until their conntrack
/// entry tells; keeps the order of all records.
pub struct NatWatch {
    own: u64,
    spaces: HashMap<u64, Space>,
    pending: VecDeque<Pending>,
}

impl NatWatch {
    pub fn new() -> Self {
        let own = own_netns_cookie().unwrap_or(0);
        let mut spaces = HashMap::new();
        spaces.insert(
            own,
            Space {
                nat: Space::check(None),
                checked: Instant::now(),
                conntrack: Conntrack::open().ok(),
            },
        );
        Self {
            own,
            spaces,
            pending: VecDeque::new(),
        }
    }

    /// Queues `record` (of `event`); what is ready comes out of [`Self::ready`].
    pub fn admit(&mut self, record: DecisionRecord, event: &Event) {
        let ported = event.origin_port != 0
            && matches!(
                record.outcome.as_ref(),
                "bound" | "app_chose" | "kernel_chose"
            );
        let mut spaces = Vec::new();
        if ported {
            let new_space = !self.spaces.contains_key(&event.netns_cookie);
            if new_space {
                // A new namespace is often a new container, whose runtime
                // has just added its masquerade rules here (CNI, netavark):
                // look again now rather than at the next recheck.
                self.force_refresh(self.own);
            } else {
                self.refresh(self.own, None);
            }
            if event.netns_cookie != self.own {
                self.learn(event.netns_cookie, event.pid_tgid);
            }
            for cookie in [event.netns_cookie, self.own] {
                if self.spaces.get(&cookie).is_some_and(|s| s.nat) && !spaces.contains(&cookie) {
                    spaces.push(cookie);
                }
            }
        }
        self.pending.push_back(Pending {
            at: Instant::now(),
            record,
            spaces,
        });
    }

    /// The records at the head of the queue that are ready, in order.
    pub fn ready(&mut self) -> Vec<DecisionRecord> {
        let mut tables: HashMap<u64, Vec<Entry>> = HashMap::new();
        let mut out = Vec::new();
        while let Some(head) = self.pending.front_mut() {
            if head.spaces.is_empty() {
                out.push(self.pending.pop_front().unwrap().record);
                continue;
            }
            let age = head.at.elapsed();
            if age < LOOK_AFTER {
                break;
            }
            let mut found = None;
            for cookie in &head.spaces {
                let table = tables.entry(*cookie).or_insert_with(|| {
                    self.spaces
                        .get(cookie)
                        .and_then(|s| s.conntrack.as_ref())
                        .and_then(|c| c.dump().inspect_err(|e| debug!("conntrack: {e}")).ok())
                        .unwrap_or_default()
                });
                if let Some(port) = wire_port(&head.record, table) {
                    found = Some(port);
                    break;
                }
            }
            debug!(
                "conntrack: {} from port {}: {}",
                head.record.destination,
                head.record.origin_port,
                found.map_or("not found".to_string(), |p| format!("left as port {p}"))
            );
            match found {
                Some(port) => {
                    head.record.nat_port = (port != head.record.origin_port).then_some(port);
                }
                None if age < GIVE_UP => break,
                None => {}
            }
            out.push(self.pending.pop_front().unwrap().record);
        }
        out
    }

    /// Rechecks our own namespace's NAT rules now.
    fn force_refresh(&mut self, cookie: u64) {
        if let Some(space) = self.spaces.get_mut(&cookie) {
            space.nat = Space::check(None);
            space.checked = Instant::now();
        }
    }

    /// Rechecks a known namespace's NAT rules when due.
    fn refresh(&mut self, cookie: u64, netns: Option<&File>) {
        if let Some(space) = self.spaces.get_mut(&cookie)
            && space.checked.elapsed() >= RECHECK
        {
            space.nat = Space::check(netns);
            space.checked = Instant::now();
        }
    }

    /// Finds the namespace of cookie `cookie` through the thread that
    /// connected (`pid_tgid` as the hook saw it: a thread may have entered
    /// a namespace its process's main thread is not in); unknown when the
    /// thread is gone already.
    fn learn(&mut self, cookie: u64, pid_tgid: u64) {
        let (tgid, tid) = (pid_tgid >> 32, pid_tgid & 0xffff_ffff);
        if let Some(space) = self.spaces.get(&cookie)
            && space.checked.elapsed() < RECHECK
        {
            return;
        }
        // Until found (the thread may be gone already): no NAT of its
        // own known, asked again after RECHECK.
        self.spaces.insert(
            cookie,
            Space {
                nat: false,
                checked: Instant::now(),
                conntrack: None,
            },
        );
        let Ok(netns) = File::open(format!("/proc/{tgid}/task/{tid}/ns/net")) else {
            return;
        };
        let Ok(copy) = netns.try_clone() else { return };
        let Ok((conntrack, found)) = Conntrack::open_in(copy) else {
            return;
        };
        // The thread id may have been reused by a thread elsewhere.
        if found != cookie {
            return;
        }
        self.spaces.insert(
            cookie,
            Space {
                nat: Space::check(Some(&netns)),
                checked: Instant::now(),
                conntrack: Some(conntrack),
            },
        );
    }
}

/// The origin port the connection of `record` has in `table`'s reply
/// tuple, if the table has it. The event has no source address (the route
/// picks it after the hook), so an earlier connection from the same port
/// to the same destination (another container's, in TIME_WAIT) matches
/// too: the entry with the most time left is the newest.
fn wire_port(record: &DecisionRecord, table: &[Entry]) -> Option<u16> {
    let dest: SocketAddr = record.destination.parse().ok()?;
    let protocol = if record.protocol == "udp" { 17 } else { 6 };
    table
        .iter()
        .filter(|e| {
            e.original.protocol == protocol
                && e.original.src_port == record.origin_port
                && e.original.dst == Some(dest.ip())
                && e.original.dst_port == dest.port()
        })
        .max_by_key(|e| e.timeout)
        .map(|e| e.reply.dst_port)
}
