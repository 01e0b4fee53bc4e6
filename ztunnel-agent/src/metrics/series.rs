//! The live label sets of the `istio_tcp_*` families, so their count stays bounded: a label
//! set names two workloads, and pods come and go (upstream's series grow without end,
//! istio/ztunnel#1719). A label set is evicted from every family once it has had no open
//! connection and no activity for the idle interval and neither workload it was last seen
//! with still exists; at the limit, the least recently active idle set makes room, and when
//! every set is in use the new one is refused (counted, the connection itself unaffected).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a label set left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Idle past the interval, and its workloads are gone.
    Idle,
    /// Made room for a new label set at the limit.
    Limit,
}

impl Eviction {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Eviction::Idle => "idle",
            Eviction::Limit => "limit",
        }
    }
}

#[derive(Debug)]
struct Entry<K, V> {
    /// The shared copy of the set (also the map's key).
    key: Arc<K>,
    /// What the caller keeps with the set (the metric handles counted under it).
    value: V,
    open: u32,
    last_active: Instant,
    /// The workload uids (source, destination) it was last counted for, where known.
    workloads: [Option<String>; 2],
}

impl<K, V> Entry<K, V> {
    /// Active now, for a connection between `workloads`, for `purpose`.
    fn touch(&mut self, workloads: [Option<&str>; 2], purpose: Purpose, now: Instant) {
        self.last_active = now;
        for (slot, uid) in self.workloads.iter_mut().zip(workloads) {
            if let Some(uid) = uid {
                if slot.as_deref() != Some(uid) {
                    *slot = Some(uid.to_string());
                }
            }
        }
        if purpose == Purpose::Open {
            self.open += 1;
        }
    }
}

/// Label sets of type `K` and what keeps each alive, each with a value `V` the caller keeps
/// with it (made once, when the set is added).
#[derive(Debug)]
pub struct Series<K, V = ()> {
    /// Keyed by a shared copy: the connections counted under a set hold the same `Arc`
    /// instead of a copy of its labels each.
    entries: HashMap<Arc<K>, Entry<K, V>>,
    limit: usize,
    idle: Duration,
    evicted_idle: u64,
    evicted_limit: u64,
    refused: u64,
}

/// How long a set must have been idle before it makes room for a new one at the limit
/// (several scrapes; the idle interval if that is shorter).
pub const LIMIT_MIN_IDLE: Duration = Duration::from_secs(30);

/// What a label set is admitted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A connection opening: counted open until [`Series::closed`].
    Open,
    /// A one-off count (a connection that failed to establish).
    Event,
    /// The close of a connection that was counted open, under its final flag: admitted even
    /// past the bound, so the closed count never falls behind the opened one.
    CloseOfCounted,
}

/// What [`Series::admit`] decided.
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<K> {
    /// Known or added; count under it.
    Counted,
    /// Added after evicting this idle set (remove it from the families).
    CountedAfterEvicting(Arc<K>),
    /// At the limit with every set in use: do not count.
    Refused,
}

/// A set admitted by [`Series::admit_with`]: its shared copy and its value, and the idle
/// set evicted to make room for it (remove it from the families).
#[derive(Debug)]
pub struct Admitted<K, V> {
    pub key: Arc<K>,
    pub value: V,
    pub evicted: Option<Arc<K>>,
}

#[cfg(test)]
impl<K: std::hash::Hash + Eq + Clone> Series<K, ()> {
    /// Marks `key` active now (adding it if there is room), for a connection between
    /// `workloads`, for `purpose`.
    pub fn admit(
        &mut self,
        key: &K,
        workloads: [Option<&str>; 2],
        purpose: Purpose,
        now: Instant,
    ) -> Admission<K> {
        match self.admit_with(key, workloads, purpose, now, || ()) {
            Some(Admitted {
                evicted: Some(old), ..
            }) => Admission::CountedAfterEvicting(old),
            Some(_) => Admission::Counted,
            None => Admission::Refused,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Series<K, V> {
    /// Bounded to `limit` sets; idle ones go after `idle`.
    pub fn new(limit: usize, idle: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            limit: limit.max(1),
            idle,
            evicted_idle: 0,
            evicted_limit: 0,
            refused: 0,
        }
    }

    /// Marks `key` active now (adding it, with the value `value` makes, if there is room),
    /// for a connection between `workloads`, for `purpose`; None when refused (at the limit
    /// with every set in use). A known set costs one lookup.
    pub fn admit_with(
        &mut self,
        key: &K,
        workloads: [Option<&str>; 2],
        purpose: Purpose,
        now: Instant,
        value: impl FnOnce() -> V,
    ) -> Option<Admitted<K, V>> {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.touch(workloads, purpose, now);
            return Some(Admitted {
                key: entry.key.clone(),
                value: entry.value.clone(),
                evicted: None,
            });
        }
        let mut evicted = None;
        let bounded = purpose != Purpose::CloseOfCounted;
        if bounded && self.entries.len() >= self.limit {
            // Only a set idle for a while makes room: one that closed a moment ago would take
            // its last counts with it before they were scraped.
            let min_idle = self.idle.min(LIMIT_MIN_IDLE);
            let oldest_idle = self
                .entries
                .iter()
                .filter(|(_, e)| {
                    e.open == 0 && now.saturating_duration_since(e.last_active) >= min_idle
                })
                .min_by_key(|(_, e)| e.last_active)
                .map(|(k, _)| k.clone());
            match oldest_idle {
                Some(old) => {
                    self.entries.remove(&old);
                    self.evicted_limit += 1;
                    evicted = Some(old);
                }
                None => {
                    self.refused += 1;
                    return None;
                }
            }
        }
        let mut entry = Entry {
            key: Arc::new(key.clone()),
            value: value(),
            open: 0,
            last_active: now,
            workloads: [None, None],
        };
        entry.touch(workloads, purpose, now);
        let admitted = Admitted {
            key: entry.key.clone(),
            value: entry.value.clone(),
            evicted,
        };
        self.entries.insert(entry.key.clone(), entry);
        Some(admitted)
    }

    /// A connection counted open under `key` ended: the set's value, while it is held.
    pub fn closed(&mut self, key: &K, now: Instant) -> Option<V> {
        let entry = self.entries.get_mut(key)?;
        entry.open = entry.open.saturating_sub(1);
        entry.last_active = now;
        Some(entry.value.clone())
    }

    /// Removes and returns the sets idle past the interval whose workloads no longer exist
    /// (`exists(uid)`); a set that never knew a workload goes on idleness alone.
    pub fn evict_idle(&mut self, now: Instant, exists: impl Fn(&str) -> bool) -> Vec<Arc<K>> {
        let idle = self.idle;
        let gone: Vec<Arc<K>> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.open == 0
                    && now.saturating_duration_since(e.last_active) >= idle
                    && !e.workloads.iter().flatten().any(|uid| exists(uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.entries.remove(k);
        }
        self.evicted_idle += gone.len() as u64;
        gone
    }

    /// Changes the bound and the idle interval (sets beyond a lower bound go as new ones
    /// arrive).
    pub fn configure(&mut self, limit: usize, idle: Duration) {
        self.limit = limit.max(1);
        self.idle = idle;
    }

    /// Live sets.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The idle interval.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Sets evicted so far, by reason.
    pub fn evicted(&self, reason: Eviction) -> u64 {
        match reason {
            Eviction::Idle => self.evicted_idle,
            Eviction::Limit => self.evicted_limit,
        }
    }

    /// New sets refused at the limit so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    #[test]
    fn an_idle_set_goes_only_once_its_workloads_are_gone() {
        let t0 = Instant::now();
        let mut s = Series::new(10, IDLE);
        assert_eq!(
            s.admit(&"a", [Some("uid-a"), Some("uid-b")], Purpose::Open, t0),
            Admission::Counted
        );
        // Open: never evicted, however long.
        assert!(s.evict_idle(t0 + IDLE * 10, |_| false).is_empty());
        s.closed(&"a", t0 + IDLE);
        // Idle, but not long enough.
        assert!(s.evict_idle(t0 + IDLE + IDLE / 2, |_| false).is_empty());
        // Idle long enough, but the destination workload still exists.
        assert!(s.evict_idle(t0 + IDLE * 3, |uid| uid == "uid-b").is_empty());
        assert_eq!(s.evict_idle(t0 + IDLE * 3, |_| false), vec![Arc::new("a")]);
        assert_eq!((s.len(), s.evicted(Eviction::Idle)), (0, 1));
    }

    /// A set's value (its metric handles) is made once, when the set is added, and every
    /// later admission and close of the set gets that same value and shared key, until the
    /// set goes.
    #[test]
    fn a_sets_value_is_made_once_and_shared_until_the_set_goes() {
        let t0 = Instant::now();
        let mut s: Series<u8, Arc<u32>> = Series::new(10, IDLE);
        let made = std::cell::Cell::new(0);
        let make = || {
            made.set(made.get() + 1);
            Arc::new(made.get())
        };
        let admitted = |s: &mut Series<u8, Arc<u32>>| {
            let admitted = s.admit_with(&7, [None, None], Purpose::Open, t0, &make);
            let admitted = admitted.expect("admitted");
            assert!(admitted.evicted.is_none());
            admitted
        };
        let (first, second) = (admitted(&mut s), admitted(&mut s));
        assert_eq!(made.get(), 1, "made once");
        assert!(Arc::ptr_eq(&first.value, &second.value));
        assert!(Arc::ptr_eq(&first.key, &second.key));
        let closed = s.closed(&7, t0).expect("held");
        assert!(Arc::ptr_eq(&closed, &first.value));
        s.closed(&7, t0);
        assert_eq!(s.evict_idle(t0 + IDLE, |_| false).len(), 1);
        assert_eq!(s.closed(&7, t0), None, "gone with its set");
        // Back after it went: a new value.
        assert_eq!(*admitted(&mut s).value, 2);
    }

    #[test]
    fn a_set_without_workloads_goes_on_idleness_alone() {
        let t0 = Instant::now();
        let mut s = Series::new(10, IDLE);
        s.admit(&"unknown", [None, None], Purpose::Event, t0);
        assert!(s.evict_idle(t0 + IDLE / 2, |_| true).is_empty());
        assert_eq!(s.evict_idle(t0 + IDLE, |_| true), vec![Arc::new("unknown")]);
    }

    #[test]
    fn at_the_limit_the_oldest_idle_set_makes_room_and_busy_sets_refuse() {
        let t0 = Instant::now();
        let mut s = Series::new(2, IDLE);
        s.admit(&"old", [None, None], Purpose::Event, t0);
        s.admit(&"busy", [None, None], Purpose::Open, t0);
        // "old" closed only just: it keeps its place (its last counts are not yet scraped).
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(
            s.admit(&"new", [None, None], Purpose::Open, soon),
            Admission::Refused
        );
        let t1 = t0 + LIMIT_MIN_IDLE;
        assert_eq!(
            s.admit(&"new", [None, None], Purpose::Open, t1),
            Admission::CountedAfterEvicting(Arc::new("old"))
        );
        assert_eq!(s.evicted(Eviction::Limit), 1);
        // Both remaining are open: refused, and the known ones still count.
        assert_eq!(
            s.admit(&"newer", [None, None], Purpose::Event, t1),
            Admission::Refused
        );
        assert_eq!(
            s.admit(&"busy", [None, None], Purpose::Event, t1),
            Admission::Counted
        );
        // The flagged close of a counted connection goes in past the bound.
        assert_eq!(
            s.admit(&"busy-denied", [None, None], Purpose::CloseOfCounted, t1),
            Admission::Counted
        );
        assert_eq!((s.len(), s.refused()), (3, 2));
    }
}
