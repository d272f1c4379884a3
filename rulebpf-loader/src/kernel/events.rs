//! The decision-event maps of an instance (`rulebpf-common::event_map_names`):
//! the ring buffer the rule-set hooks write [`Event`]s to, the control word
//! that tells them whether anyone listens, and their per-CPU counts.
//!
//! One reader per instance: a BPF ring buffer has a single consumer
//! position, so two readers would each see part of the stream (who shares
//! it, and how: `crate::service::events`).

use aya::maps::{Array, Map, MapData, MapError, PerCpuArray, RingBuf};
use rulebpf_common::{EVENTS_NO_MATCH, EVENTS_ON, Event, EventCount, event_map_names};

use crate::sys::securedir::SecureDir;

#[derive(Debug, thiserror::Error)]
pub enum EventMapsError {
    #[error(
        "instance has no event maps yet ({0} missing): they come with its next rule set (`rulebpf attach` again)"
    )]
    Missing(&'static str),
    #[error("opening {path}")]
    Open {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("writing the event control word")]
    Control(#[source] MapError),
}

/// The ring buffer and its control word, opened from an instance's pins.
pub struct EventRing {
    pub ring: RingBuf<MapData>,
    control: Array<MapData, u32>,
}

/// Which events the hooks make.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub on: bool,
    /// Also connects no rule matched.
    pub no_match: bool,
}

impl Wanted {
    fn word(self) -> u32 {
        match (self.on, self.no_match) {
            (false, _) => 0,
            (true, false) => EVENTS_ON,
            (true, true) => EVENTS_ON | EVENTS_NO_MATCH,
        }
    }
}

impl EventRing {
    pub fn open(pins: &SecureDir) -> Result<Self, EventMapsError> {
        let ring = RingBuf::try_from(open(pins, event_map_names::EVENTS)?)
            .map_err(open_error(pins, event_map_names::EVENTS))?;
        let control = Array::try_from(open(pins, event_map_names::CONTROL)?)
            .map_err(open_error(pins, event_map_names::CONTROL))?;
        Ok(Self { ring, control })
    }

    /// Tells the hooks which events to make (0: none, the one map read).
    pub fn set_wanted(&mut self, wanted: Wanted) -> Result<(), EventMapsError> {
        self.control
            .set(0, &wanted.word(), 0)
            .map_err(EventMapsError::Control)
    }

    /// The next event the hooks wrote, if any (a record of another size is
    /// skipped: never one of ours).
    pub fn next_event(&mut self) -> Option<Option<Event>> {
        let item = self.ring.next()?;
        Some(decode(&item))
    }
}

impl Drop for EventRing {
    /// Whoever stops reading stops the events: a reader that dies without
    /// this leaves them on, and the next reader (or the ring filling up,
    /// counted as drops) is what remains.
    fn drop(&mut self) {
        let _ = self.set_wanted(Wanted::default());
    }
}

fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() != size_of::<Event>() {
        return None;
    }
    // SAFETY: `Event` is plain old data of exactly this size; the read is
    // unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// Events written and dropped (ring full) since the instance's event maps
/// were made, summed over CPUs; `None` before they exist.
pub fn counts(pins: &SecureDir) -> Result<Option<(u64, u64)>, EventMapsError> {
    let name = event_map_names::COUNTS;
    if !pins.contains(name) {
        return Ok(None);
    }
    let counts: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open(pins, name)?).map_err(open_error(pins, name))?;
    let sum = |which: EventCount| -> Result<u64, EventMapsError> {
        let per_cpu = counts
            .get(&(which as u32), 0)
            .map_err(open_error(pins, name))?;
        Ok(per_cpu.iter().sum())
    };
    Ok(Some((sum(EventCount::Written)?, sum(EventCount::Dropped)?)))
}

fn open(pins: &SecureDir, name: &'static str) -> Result<Map, EventMapsError> {
    if !pins.contains(name) {
        return Err(EventMapsError::Missing(name));
    }
    let data = MapData::from_pin(pins.fd_path(name)).map_err(open_error(pins, name))?;
    Map::from_map_data(data).map_err(open_error(pins, name))
}

fn open_error(pins: &SecureDir, name: &str) -> impl Fn(MapError) -> EventMapsError {
    let path = pins.display(name).display().to_string();
    move |source| EventMapsError::Open {
        path: path.clone(),
        source,
    }
}
