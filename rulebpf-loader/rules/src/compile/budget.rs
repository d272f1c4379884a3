//! What compiling a rule set may cost, counted while it runs.
//!
//! A few lines can multiply: 160 rules fixing one octet each at different
//! positions (`x.*.*.*`, `*.x.*.*`, ... for x in 0..40) need 41^4 port
//! tables, 712 MB of kernel memory. So the compiler keeps a [`Meter`]: every state, edge and
//! port prefix it creates is priced as the kernel will charge for it
//! ([`MapSizes::kernel_memory`]), and the work it does is counted; the first
//! step over the [`Budget`] stops the compile, long before its own memory
//! grows with the output.
//!
//! States and edges are counted as built, before states with equal futures
//! are merged (minimisation, at the end): the running figure can only be
//! above the final one, so the budget errs on the side of refusing. For real
//! files merging saves little (100,000 rules: 398 states either way).

use std::fmt;

use rulebpf_common::{PortKey, RuleStats, SELECTORS, Verdict};

/// The limits of one compile. The default fits 100,000 ordinary rules many
/// times over and refuses the 160 lines above in about 2 s of CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Kernel memory the lookup maps (automaton and port tables) may take,
    /// as [`KernelMemory::lookup`] estimates it. The per-rule counters are
    /// not in it: they grow with the number of rules only, which the file
    /// size already bounds.
    pub max_kernel_bytes: u64,
    /// Steps the construction may take (one per rule reference visited or
    /// copied into a state): a bound on the compiler's own time and memory
    /// when the output stays small but the states hold many rules each.
    pub max_work: u64,
}

/// 256 MiB: 100,000 ordinary rules need 14 MiB (and 6 MiB of counters on
/// 2 CPUs), 50,000 random IPv6 addresses 110 MiB; more is a file that
/// multiplies, or one that should say so with a larger limit.
pub const DEFAULT_MAX_KERNEL_BYTES: u64 = 256 << 20;
/// A few seconds of construction and at most a few hundred MB of the
/// compiler's memory; 100,000 ordinary rules take 1.3 million steps,
/// 100,000 names with an IPv4 and an IPv6 address each 12 million.
pub const DEFAULT_MAX_WORK: u64 = 100_000_000;

impl Default for Budget {
    fn default() -> Self {
        Self {
            max_kernel_bytes: DEFAULT_MAX_KERNEL_BYTES,
            max_work: DEFAULT_MAX_WORK,
        }
    }
}

/// Entries of the maps a compiled rule set fills (layouts in
/// `rulebpf-common`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    /// `RULEBPF_DFA_DEFAULT` (array, `u32` per state).
    pub states: u64,
    /// `RULEBPF_DFA_EDGES` (hash, 8-byte key, `u32` value, preallocated).
    pub edges: u64,
    /// `RULEBPF_PORTS` (LPM trie, 6-byte key, 12-byte value).
    pub port_prefixes: u64,
    /// `RULEBPF_STATS` (per-CPU array, 24 bytes) and `RULEBPF_CURSOR`
    /// (array, `u64`), one entry per rule.
    pub rules: u64,
}

/// Kernel memory of a rule set's maps, as the kernel charges it: the
/// `memlock` line of each map's fdinfo (`*_map_mem_usage()` in
/// kernel/bpf/arraymap.c, hashtab.c, lpm_trie.c). The LPM trie's
/// intermediate nodes and slab rounding are not charged, so the memory
/// really used is somewhat higher; the figure is what `rulebpf attach
/// --json` reports as `map_memlock_bytes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelMemory {
    /// The automaton and the port tables: what the rules' shapes decide.
    pub lookup: u64,
    /// The per-rule counters and cursors: linear in the rule count, and in
    /// the number of possible CPUs.
    pub per_rule: u64,
}

impl KernelMemory {
    pub fn total(&self) -> u64 {
        self.lookup + self.per_rule
    }
}

/// The kernel's sizes behind the estimate (x86_64, Linux 6.18), checked
/// against the `memlock` of maps the loader filled: 568 bytes short (the
/// object's other, fixed maps) from 3 KB to 115 MB (see the tests).
mod kernel {
    /// `struct bpf_array` / `struct bpf_htab` with their `struct bpf_map`:
    /// a fixed cost per map.
    pub const MAP: u64 = 320;
    /// `struct htab_elem` before the key: list node, pointers, hash.
    pub const HTAB_ELEM: u64 = 48;
    /// `struct bucket` (list head and spinlock), one per bucket; the
    /// bucket count is the entry count rounded up to a power of two.
    pub const HTAB_BUCKET: u64 = 16;
    /// `struct lpm_trie_node` before its key and value: two child
    /// pointers, the prefix length and flags. (Before Linux 6.13 it also
    /// held an `rcu_head`, 16 bytes more.)
    pub const LPM_NODE: u64 = 24;
}

/// The sizes of the maps' values that follow `rulebpf-common`'s layouts.
#[derive(Clone, Copy, Debug)]
struct Layout {
    verdict: u64,
    rule_stats: u64,
}

impl Layout {
    const CURRENT: Self = Self {
        verdict: size_of::<Verdict>() as u64,
        rule_stats: size_of::<RuleStats>() as u64,
    };
}

impl MapSizes {
    /// What the kernel charges for maps of these sizes with
    /// `possible_cpus` possible CPUs (hash maps keep spare elements and
    /// locks per CPU; per-CPU arrays a value per CPU).
    pub fn kernel_memory(&self, possible_cpus: u32) -> KernelMemory {
        self.kernel_memory_of(Layout::CURRENT, possible_cpus)
    }

    fn kernel_memory_of(&self, layout: Layout, possible_cpus: u32) -> KernelMemory {
        use kernel::*;
        let cpus = u64::from(possible_cpus.max(1));
        // array_map_mem_usage(): elements are rounded up to 8 bytes.
        let array = |entries: u64, value: u64| MAP + entries * value.next_multiple_of(8);
        // htab_map_mem_usage(), preallocated: buckets, lock counters (8 per
        // CPU), and max_entries + one spare per CPU elements, key and value
        // rounded up to 8 bytes.
        let edge = HTAB_ELEM + 2 * 8;
        let edges = MAP
            + HTAB_BUCKET * self.edges.max(1).next_power_of_two()
            + 4 * 8 * cpus
            + edge * (self.edges + cpus)
            + 8 * cpus;
        // trie_mem_usage(): one node per entry, key and value as they are.
        let node = LPM_NODE + size_of::<PortKey>() as u64 + layout.verdict;
        let ports = MAP + node * self.port_prefixes;
        let roots = array(SELECTORS.into(), 4);
        // percpu array: a pointer per entry, a value per entry per CPU.
        let stats = MAP + self.rules * (8 + layout.rule_stats.next_multiple_of(8) * cpus);
        KernelMemory {
            lookup: roots + array(self.states, 4) + edges + ports,
            per_rule: stats + array(self.rules, 8),
        }
    }
}

/// The budget ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Exceeded {
    KernelMemory,
    Work,
}

/// Counts what a compile has built and done so far, against its budget.
pub(super) struct Meter {
    budget: Budget,
    sizes: MapSizes,
    work: u64,
}

impl Meter {
    pub(super) fn new(budget: Budget) -> Self {
        Self {
            budget,
            sizes: MapSizes::default(),
            work: 0,
        }
    }

    pub(super) fn budget(&self) -> Budget {
        self.budget
    }

    /// Counts `steps` of construction work.
    pub(super) fn work(&mut self, steps: usize) -> Result<(), Exceeded> {
        self.work = self.work.saturating_add(steps as u64);
        if self.work > self.budget.max_work {
            return Err(Exceeded::Work);
        }
        Ok(())
    }

    /// Counts new map entries.
    pub(super) fn built(
        &mut self,
        states: usize,
        edges: usize,
        port_prefixes: usize,
    ) -> Result<(), Exceeded> {
        self.sizes.states += states as u64;
        self.sizes.edges += edges as u64;
        self.sizes.port_prefixes += port_prefixes as u64;
        // The budget is machine-independent: one CPU.
        if self.sizes.kernel_memory(1).lookup > self.budget.max_kernel_bytes {
            return Err(Exceeded::KernelMemory);
        }
        Ok(())
    }
}

/// The rules that made a compile too large: those whose address pattern
/// fixes an octet after a free one (`*.5.*.*`, `10.*.5.*`), the shape that
/// multiplies states, found in most of the states being built when the
/// budget ran out; first few lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Culprits {
    /// Their lines, at most [`Culprits::SHOWN`], ascending.
    pub lines: Vec<u32>,
    /// How many more there are.
    pub more: usize,
}

impl Culprits {
    pub const SHOWN: usize = 5;
}

impl fmt::Display for Culprits {
    /// Empty, or `; ...: lines 2, 3, 4 and 117 more`, to follow a message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lines.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = self.lines.iter().map(u32::to_string).collect();
        let plural = if lines.len() + self.more > 1 { "s" } else { "" };
        write!(
            f,
            "; it comes from the address patterns that fix an octet after a `*`, \
             which multiply each other's states: line{plural} {}",
            lines.join(", ")
        )?;
        match self.more {
            0 => Ok(()),
            more => write!(f, " and {more} more"),
        }
    }
}

/// `bytes` for a message: `256 MiB`, `19.6 MiB`, `12.5 KiB`, `100 bytes`.
pub fn size(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;
    match bytes {
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= MIB => format!("{:.1} MiB", b as f64 / MIB as f64),
        b if b >= KIB => format!("{:.1} KiB", b as f64 / KIB as f64),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule sets the loader attached on Linux 6.18 with 2 possible CPUs,
    /// when `Verdict` was 12 bytes and `RuleStats` 24: their map sizes
    /// (states, edges, port prefixes, rules) and the `map_memlock_bytes`
    /// it reported.
    const MEASURED: [(&str, [u64; 5]); 5] = [
        ("2 rules", [7, 4, 2, 2, 3_316]),
        (
            "100k addresses",
            [398, 100_397, 100_004, 100_000, 19_128_640],
        ),
        (
            "100k /24s",
            [100_394, 100_393, 100_000, 100_000, 19_928_184],
        ),
        (
            "50k IPv6",
            [970_308, 1_070_306, 50_000, 50_000, 115_119_208],
        ),
        ("80 crossed", [9_724, 194_480, 740_880, 80, 47_843_624]),
    ];

    #[test]
    fn the_estimate_is_what_the_kernel_charged() {
        let then = Layout {
            verdict: 12,
            rule_stats: 24,
        };
        for (what, [states, edges, port_prefixes, rules, memlock]) in MEASURED {
            let sizes = MapSizes {
                states,
                edges,
                port_prefixes,
                rules,
            };
            let estimate = sizes.kernel_memory_of(then, 2).total();
            let error = estimate.abs_diff(memlock) as f64 / memlock as f64;
            // Off by 568 bytes, the object's other maps (globals): a small
            // set is off by more.
            let tolerance = if memlock < 1 << 20 { 0.25 } else { 0.001 };
            assert!(error < tolerance, "{what}: {estimate} for {memlock}");
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(256 << 20), "256 MiB");
        assert_eq!(size(19_128_640), "18.2 MiB");
        assert_eq!(size(3316), "3.2 KiB");
        assert_eq!(size(100), "100 bytes");
    }
}
