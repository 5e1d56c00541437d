//! A change data capture source's state file (`<dir>/state.json`), saved either at once or
//! in the background.
//!
//! A source notes its progress (a snapshot chunk done, a binlog position durable) many times
//! a second while it reads. Each save is a temporary file, two fsyncs and a rename: done on
//! the source's task, it stopped the reading for a few milliseconds every time. Progress
//! only needs to be saved eventually — a restart from an older position reads again what
//! the log already holds, and the log's de-duplication drops it — so such saves are handed
//! to a background thread ([`StateFile::save_later`]) that always writes the newest state
//! queued, never an older one after a newer one, and at most one every [`SAVE_INTERVAL`]
//! (written back to back, the saves of a snapshot's chunks or a binlog's positions kept a
//! core ~14% busy in the file system). Saves that must be on disk before the source goes on
//! (a table's stream, a queued or finished snapshot) use [`StateFile::save`], which also
//! waits for the background saves queued before it, without waiting out the interval.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// Background saves are this far apart at least: a restart reads again at most what the
/// source read in this time.
pub(crate) const SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

pub(crate) struct StateFile {
    path: PathBuf,
    shared: Arc<Shared>,
    /// [`SAVE_INTERVAL`] (tests set their own).
    interval: std::time::Duration,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    saved: Condvar,
    /// Wakes the saver waiting out the interval: someone waits for a save.
    wanted: Condvar,
}

#[derive(Default)]
struct Slot {
    /// The newest state queued and not yet taken by the saver, with its number.
    next: Option<(u64, Vec<u8>)>,
    /// Number of the last state queued.
    queued: u64,
    /// Number of the last state written (or whose write failed, see `error`).
    saved: u64,
    /// The newest state number someone waits to be written.
    waited_for: u64,
    /// States written (for tests).
    writes: u64,
    /// Whether a saver thread is running.
    writing: bool,
    /// A background save that failed, reported by the next call.
    error: Option<String>,
}

impl StateFile {
    pub(crate) fn new(dir: &Path) -> StateFile {
        StateFile { path: dir.join("state.json"), shared: Arc::default(), interval: SAVE_INTERVAL }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state (after the saves queued so far), or the default before the first.
    pub(crate) fn load<T: serde::de::DeserializeOwned + Default>(&self) -> anyhow::Result<T> {
        self.flush()?;
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", self.path.display())),
        }
    }

    /// Saves `s` durably; returns once it is on disk.
    pub(crate) fn save<T: serde::Serialize>(&self, s: &T) -> anyhow::Result<()> {
        let n = self.queue(s)?;
        self.wait(n)
    }

    /// Queues `s` to be saved by a background thread and returns at once. A failed
    /// background save is reported by the next call.
    pub(crate) fn save_later<T: serde::Serialize>(&self, s: &T) -> anyhow::Result<()> {
        self.queue(s).map(|_| ())
    }

    /// Waits until every state queued so far is on disk.
    pub(crate) fn flush(&self) -> anyhow::Result<()> {
        let n = self.shared.slot.lock().queued;
        self.wait(n)
    }

    fn queue<T: serde::Serialize>(&self, s: &T) -> anyhow::Result<u64> {
        let bytes = serde_json::to_vec_pretty(s)?;
        let mut slot = self.shared.slot.lock();
        if let Some(e) = slot.error.take() {
            return Err(anyhow::anyhow!(e));
        }
        slot.queued += 1;
        let n = slot.queued;
        slot.next = Some((n, bytes));
        if !slot.writing {
            slot.writing = true;
            let (path, shared, interval) = (self.path.clone(), self.shared.clone(), self.interval);
            let spawned = std::thread::Builder::new().name("sluice-state".into()).spawn(move || write_queued(&path, &shared, interval));
            if let Err(e) = spawned {
                slot.writing = false;
                slot.next = None;
                slot.queued -= 1;
                return Err(anyhow::anyhow!("save source state {}: no thread to write it: {e}", self.path.display()));
            }
        }
        Ok(n)
    }

    fn wait(&self, n: u64) -> anyhow::Result<()> {
        let mut slot = self.shared.slot.lock();
        if slot.saved < n {
            slot.waited_for = slot.waited_for.max(n);
            self.shared.wanted.notify_all();
        }
        while slot.saved < n {
            self.shared.saved.wait(&mut slot);
        }
        match slot.error.take() {
            Some(e) => Err(anyhow::anyhow!(e)),
            None => Ok(()),
        }
    }
}

/// The saver thread: writes the newest queued state until none is left, waiting
/// `interval` after each write unless someone waits for a save.
fn write_queued(path: &Path, shared: &Shared, interval: std::time::Duration) {
    let mut last_write: Option<std::time::Instant> = None;
    loop {
        if let Some(at) = last_write {
            let until = at + interval;
            let mut slot = shared.slot.lock();
            while slot.waited_for <= slot.saved {
                if shared.wanted.wait_until(&mut slot, until).timed_out() {
                    break;
                }
            }
        }
        let (n, bytes) = {
            let mut slot = shared.slot.lock();
            match slot.next.take() {
                Some(next) => next,
                None => {
                    slot.writing = false;
                    return;
                }
            }
        };
        let res = sluice_core::fs::write_durably(path, &bytes);
        last_write = Some(std::time::Instant::now());
        let mut slot = shared.slot.lock();
        slot.writes += 1;
        if let Err(e) = res {
            slot.error = Some(format!("save source state: {e}"));
        }
        slot.saved = slot.saved.max(n);
        shared.saved.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::StateFile;

    #[test]
    fn the_newest_state_wins_and_load_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        assert_eq!(f.load::<Vec<u32>>().unwrap(), Vec::<u32>::new());
        for i in 0..200u32 {
            f.save_later(&vec![i]).unwrap();
        }
        assert_eq!(f.load::<Vec<u32>>().unwrap(), vec![199]);
        f.save_later(&vec![1000]).unwrap();
        f.save(&vec![1001]).unwrap();
        // Read without the StateFile: `save` returned only once the file held it.
        let on_disk: Vec<u32> = serde_json::from_slice(&std::fs::read(f.path()).unwrap()).unwrap();
        assert_eq!(on_disk, vec![1001]);
    }

    #[test]
    fn background_saves_are_spaced_and_waiting_for_one_does_not_wait_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        // An interval no test outlasts: whatever is written after the first save is written
        // because someone asked for it.
        let f = StateFile { interval: std::time::Duration::from_secs(3600), ..StateFile::new(dir.path()) };
        let on_disk = || serde_json::from_slice::<Vec<u32>>(&std::fs::read(f.path()).unwrap()).unwrap();
        f.save_later(&vec![0]).unwrap();
        f.flush().unwrap();
        assert_eq!(on_disk(), vec![0]);
        // The saver waits out the interval: these stay queued, only the newest is kept ...
        for i in 1..20u32 {
            f.save_later(&vec![i]).unwrap();
        }
        assert_eq!(on_disk(), vec![0]);
        assert_eq!(f.shared.slot.lock().writes, 1);
        // ... and written at once when waited for.
        f.flush().unwrap();
        assert_eq!(on_disk(), vec![19]);
        assert_eq!(f.shared.slot.lock().writes, 2);
        f.save_later(&vec![20]).unwrap();
        f.save(&vec![21]).unwrap();
        // The saver is still waiting out the interval after 19: 20 stays queued, and 21
        // replaces it and is written once waited for.
        assert_eq!(on_disk(), vec![21]);
        assert_eq!(f.shared.slot.lock().writes, 3);
    }

    #[test]
    fn a_failed_background_save_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the state's directory should be: every save fails.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"").unwrap();
        let f = StateFile::new(&blocked);
        f.save_later(&1u32).unwrap();
        let err = f.flush().unwrap_err().to_string();
        assert!(err.contains("blocked"), "{err}");
        // Reported once; a save that fails again says so again.
        assert!(f.save(&2u32).is_err());
    }
}
