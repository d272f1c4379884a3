//! One decision of the connect hooks as `rulebpf events --json` prints it
//! and as the reader hands it to every listener (one JSON object per line).

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use rulebpf_common::{Event, Family, Outcome, Protocol};
use serde::{Deserialize, Serialize};

/// The keys `--json` promises, in this order, and nothing else. What runs
/// of events share (the instance, a cgroup, a millisecond, a remark) is
/// shared, not copied: the reader makes one per connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// RFC 3339, UTC, milliseconds.
    pub time: Arc<str>,
    pub instance: Arc<str>,
    /// The connecting task's cgroup, from the cgroup2 root (`/` first).
    pub cgroup: Arc<str>,
    /// The process (thread group) id.
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    /// `tcp` or `udp`.
    pub protocol: Cow<'static, str>,
    /// `ip:port`, IPv6 in brackets.
    pub destination: String,
    /// The origin port bound or kept (0: the OS chooses).
    pub origin_port: u16,
    /// The deciding rule's line (`null`: no rule matched).
    pub line: Option<u32>,
    /// The deciding rule's remark, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remark: Option<Arc<str>>,
    /// [`Outcome::name`].
    pub outcome: Cow<'static, str>,
    /// The origin port the wire saw when NAT rewrote it; `null` otherwise.
    pub nat_port: Option<u16>,
}

/// What the reader sends a listener: a record, or how many records that
/// listener missed because it fell behind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Wire {
    Record(Box<DecisionRecord>),
    Dropped { dropped: u64 },
}

/// The destination of `event` as a socket address.
pub fn destination(event: &Event) -> SocketAddr {
    let ip = if event.family == Family::Ipv4 as u8 {
        IpAddr::V4(Ipv4Addr::from(event.dest_addr[0].to_ne_bytes()))
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in event.dest_addr.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    SocketAddr::new(ip, event.dest_port)
}

/// `tcp` or `udp`.
pub fn protocol(event: &Event) -> &'static str {
    if event.protocol == Protocol::Udp as u8 {
        "udp"
    } else {
        "tcp"
    }
}

/// The task name, up to its first NUL.
pub fn comm(event: &Event) -> String {
    let end = event.comm.iter().position(|&b| b == 0).unwrap_or(16);
    String::from_utf8_lossy(&event.comm[..end]).into_owned()
}

/// The outcome's name (`unknown` for a value this build does not know).
pub fn outcome(event: &Event) -> &'static str {
    Outcome::from_u8(event.outcome).map_or("unknown", Outcome::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(family: Family, words: [u32; 4]) -> Event {
        Event {
            family: family as u8,
            dest_addr: words,
            dest_port: 21,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            outcome: Outcome::Bound as u8,
            ..Default::default()
        }
    }

    #[test]
    fn destinations_print_as_socket_addresses() {
        let v4 = event(Family::Ipv4, [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0]);
        assert_eq!(destination(&v4).to_string(), "10.1.2.3:21");
        let one = u32::from_ne_bytes([0, 0, 0, 1]);
        let v6 = event(Family::Ipv6, [0, 0, 0, one]);
        assert_eq!(destination(&v6).to_string(), "[::1]:21");
        assert_eq!(comm(&v4), "curl");
        assert_eq!(outcome(&v4), "bound");
    }

    #[test]
    fn json_keys_are_exactly_the_promised_ones() {
        let record = DecisionRecord {
            time: "2026-12-06T10:00:00.000Z".into(),
            instance: "gw".into(),
            cgroup: "/gw".into(),
            pid: 7,
            comm: "curl".into(),
            uid: 0,
            protocol: "tcp".into(),
            destination: "10.1.2.3:21".into(),
            origin_port: 41000,
            line: Some(3),
            remark: None,
            outcome: "bound".into(),
            nat_port: None,
        };
        let json = serde_json::to_value(&record).unwrap();
        let keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        let mut expected = [
            "time",
            "instance",
            "cgroup",
            "pid",
            "comm",
            "uid",
            "protocol",
            "destination",
            "origin_port",
            "line",
            "outcome",
            "nat_port",
        ]
        .map(String::from)
        .to_vec();
        expected.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, expected);
        let line = serde_json::to_string(&Wire::Record(Box::new(record.clone()))).unwrap();
        assert_eq!(
            serde_json::from_str::<Wire>(&line).unwrap(),
            Wire::Record(Box::new(record))
        );
        assert_eq!(
            serde_json::from_str::<Wire>(r#"{"dropped":3}"#).unwrap(),
            Wire::Dropped { dropped: 3 }
        );
    }
}
