//! The settlements and releases of the last `replay_window_s`, kept to be applied again when
//! another server takes over as primary (Redis replicates asynchronously: a failover can lose
//! the newest writes).
//!
//! Each is kept compact, its keys and arguments end to end in one string: as a [`Write`] (a
//! heap string per key and argument, ~25 for a settlement) one took ~2.6 KB, and a 10 s window
//! at 7,000 requests a second ~180 MB of the gateway's memory; kept so, ~1.1 KB
//! (docs/PERFORMANCE.md, "Third stop").

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::store::{Write, WriteScript, MAX_BACKLOG};
use crate::cost::Usd;

/// One applied write, as the window keeps it.
struct Kept {
    at: Instant,
    script: WriteScript,
    cost: Usd,
    /// The keys, then the arguments, end to end.
    text: Box<str>,
    /// Where each key and argument ends in `text`.
    ends: Box<[usize]>,
    keys: usize,
    then: Vec<redis::Pipeline>,
}

impl Kept {
    fn new(at: Instant, write: Write) -> Self {
        let strings = || write.keys.iter().chain(&write.args);
        let mut text = String::with_capacity(strings().map(String::len).sum());
        let ends = strings()
            .map(|s| {
                text.push_str(s);
                text.len()
            })
            .collect();
        Self {
            at,
            script: write.script,
            cost: write.cost,
            text: text.into_boxed_str(),
            ends,
            keys: write.keys.len(),
            then: write.then,
        }
    }

    /// The write again, to be applied once more (its local accounting was cleared the first
    /// time: no accounts).
    fn into_replay(self) -> Write {
        let mut start = 0;
        let mut strings: Vec<String> = Vec::with_capacity(self.ends.len());
        for &end in self.ends.iter() {
            strings.push(self.text.get(start..end).unwrap_or_default().to_owned());
            start = end;
        }
        let args = strings.split_off(self.keys.min(strings.len()));
        Write {
            script: self.script,
            keys: strings,
            args,
            accounts: Vec::new(),
            cost: self.cost,
            must_land: true,
            replayed: true,
            then: self.then,
        }
    }
}

pub struct ReplayWindow {
    window: Duration,
    /// Oldest first.
    kept: Mutex<VecDeque<Kept>>,
}

impl ReplayWindow {
    pub fn new(window: Duration) -> Self {
        Self { window, kept: Mutex::new(VecDeque::new()) }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Keeps an applied write (spend and reservations only; none with a zero window), and lets
    /// go of those past the window or beyond [`MAX_BACKLOG`].
    pub fn remember(&self, write: Write, now: Instant) {
        if !write.must_land || self.window.is_zero() {
            return;
        }
        let write = Kept::new(now, write);
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        while kept.front().is_some_and(|k| now.duration_since(k.at) > self.window) || kept.len() >= MAX_BACKLOG {
            kept.pop_front();
        }
        kept.push_back(write);
    }

    /// Every write of the window, to apply again; the window starts empty.
    pub fn take(&self, now: Instant) -> Vec<Write> {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest = now.checked_sub(self.window);
        kept.drain(..).filter(|k| oldest.is_none_or(|oldest| k.at >= oldest)).map(Kept::into_replay).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settlement(n: usize) -> Write {
        Write {
            script: WriteScript::Settle,
            keys: vec![format!("p{{alice}}:settled"), String::new(), format!("p{{alice}}:spend:{n}")],
            args: vec![format!("member-{n}"), "1500".into(), String::new(), r#"{"user":"alice"}"#.into()],
            accounts: vec!["alice".into()],
            cost: Usd::from_pico(1500),
            must_land: true,
            replayed: false,
            then: Vec::new(),
        }
    }

    #[test]
    fn a_kept_write_comes_back_with_the_same_keys_and_arguments_marked_replayed() {
        let (window, now) = (ReplayWindow::new(Duration::from_secs(10)), Instant::now());
        window.remember(settlement(1), now);
        window.remember(settlement(2), now);
        let replay = window.take(now);
        assert_eq!(replay.len(), 2);
        let (first, second) = (&replay[0], &replay[1]);
        assert_eq!(first.keys, settlement(1).keys, "empty strings included");
        assert_eq!(first.args, settlement(1).args);
        assert_eq!(second.args[0], "member-2", "in the order applied");
        assert!(first.replayed && first.must_land && first.accounts.is_empty());
        assert_eq!((first.script, first.cost), (WriteScript::Settle, Usd::from_pico(1500)));
        assert!(window.take(now).is_empty(), "taken once");
    }

    #[test]
    fn writes_that_may_be_lost_and_a_zero_window_keep_nothing() {
        let (window, now) = (ReplayWindow::new(Duration::from_secs(10)), Instant::now());
        window.remember(Write { must_land: false, ..settlement(1) }, now);
        assert!(window.take(now).is_empty());
        let off = ReplayWindow::new(Duration::ZERO);
        off.remember(settlement(1), now);
        assert!(off.take(now).is_empty());
    }

    #[test]
    fn writes_older_than_the_window_are_not_applied_again() {
        let (window, start) = (ReplayWindow::new(Duration::from_secs(10)), Instant::now());
        window.remember(settlement(1), start);
        window.remember(settlement(2), start + Duration::from_secs(6));
        let replay = window.take(start + Duration::from_secs(12));
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].args[0], "member-2");
    }
}
