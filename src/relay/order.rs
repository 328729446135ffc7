//! Per-track delivery order at the core, sans-IO: frames arrive on one QUIC stream per group,
//! and QUIC does not order streams (the edge even sends newer groups first), so frames of group
//! g+1 can arrive before the tail of group g. They are held until group g's stream finishes,
//! or for at most `max_wait_us`, after which g is abandoned: a stalled old group never holds
//! back a newer one for long. The clock is passed in.

use crate::media::{Frame, TrackKind};
use std::collections::BTreeMap;

/// Bytes of frames held for later groups, per track: past it the current group is given up
/// as if it had waited `max_wait_us`, so an edge sending ahead cannot grow the core's memory.
pub const MAX_HELD_BYTES: usize = 64 << 20;
/// Groups further ahead of the current one than this are refused (the edge holds at most 64),
/// so the groups held, empty ones included, stay few.
pub const MAX_AHEAD_GROUPS: u64 = 256;
/// Bookkeeping counted per held frame.
const FRAME_OVERHEAD: usize = 64;

/// What happened to an offered frame.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    /// Delivered now (together with any frames it released).
    Delivered,
    /// Held until its group's turn.
    Held,
    /// Already delivered (resend after a resume).
    Duplicate,
    /// Its group was abandoned or passed, or it does not continue its group.
    Late,
}

#[derive(Debug, Default)]
struct Pending {
    frames: BTreeMap<u64, Frame>,
    finished: bool,
    since_us: u64,
}

/// Orders one track of one stream.
#[derive(Debug)]
pub struct TrackOrder {
    track: TrackKind,
    current: u64,
    next_idx: u64,
    /// The current group can no longer deliver (its start was lost).
    broken: bool,
    pending: BTreeMap<u64, Pending>,
    held_bytes: usize,
    max_wait_us: u64,
    /// When the current group last delivered or became current (µs), once anything arrived.
    progress_us: Option<u64>,
}

impl TrackOrder {
    /// Expects group `start` first.
    pub fn new(track: TrackKind, start: u64, max_wait_us: u64) -> Self {
        TrackOrder {
            track,
            current: start,
            next_idx: 0,
            broken: false,
            pending: BTreeMap::new(),
            held_bytes: 0,
            max_wait_us,
            progress_us: None,
        }
    }

    /// The group being delivered and the next index expected in it.
    pub fn position(&self) -> (u64, u64) {
        (self.current, self.next_idx)
    }

    /// A sender (re)starts at group `start`: skip ahead if that is past the current group.
    pub fn restart(&mut self, start: u64, now_us: u64, out: &mut Vec<Frame>) {
        if start > self.current {
            self.jump(start, now_us, out);
        }
    }

    /// Offers frame `idx` of group `seq`; frames ready for delivery are appended to `out`.
    pub fn offer(
        &mut self,
        seq: u64,
        idx: u64,
        frame: Frame,
        now_us: u64,
        out: &mut Vec<Frame>,
    ) -> Verdict {
        if seq < self.current {
            return Verdict::Late;
        }
        let progress = *self.progress_us.get_or_insert(now_us);
        if seq - self.current > MAX_AHEAD_GROUPS {
            // Not held (a bound on what an edge can make the core hold). If the current group
            // has made no progress for the whole wait, the sender has moved on far ahead (it
            // fell behind and skipped to its newest group): follow it there.
            if now_us.saturating_sub(progress) <= self.max_wait_us {
                return Verdict::Late;
            }
            self.jump(seq, now_us, out);
        }
        if seq == self.current {
            if idx < self.next_idx {
                return Verdict::Duplicate;
            }
            let v = self.deliver_current(idx, frame, out);
            if v == Verdict::Delivered {
                self.progress_us = Some(now_us);
            }
            return v;
        }
        let p = self.pending.entry(seq).or_insert_with(|| Pending {
            since_us: now_us,
            ..Pending::default()
        });
        if p.frames.contains_key(&idx) {
            return Verdict::Duplicate;
        }
        self.held_bytes += frame.data.len() + FRAME_OVERHEAD;
        p.frames.insert(idx, frame);
        // The oldest held group has waited too long, or too much is held: give up on the
        // current one.
        let (&oldest, p) = self.pending.iter().next().expect("just inserted");
        if now_us.saturating_sub(p.since_us) > self.max_wait_us || self.held_bytes > MAX_HELD_BYTES
        {
            let before = out.len();
            self.jump(oldest, now_us, out);
            let delivered_it = seq <= self.current && out.len() > before;
            return if delivered_it {
                Verdict::Delivered
            } else {
                Verdict::Held
            };
        }
        Verdict::Held
    }

    /// Group `seq`'s stream ended (finished or reset): nothing more will come for it.
    pub fn finish(&mut self, seq: u64, now_us: u64, out: &mut Vec<Frame>) {
        if seq < self.current {
            return;
        }
        if seq > self.current {
            if seq - self.current <= MAX_AHEAD_GROUPS {
                // Its wait starts now, not at the epoch: an empty stream for a skipped group
                // must not make the current one be given up at once.
                self.pending
                    .entry(seq)
                    .or_insert_with(|| Pending {
                        since_us: now_us,
                        ..Pending::default()
                    })
                    .finished = true;
            }
            return;
        }
        self.jump(seq + 1, now_us, out);
    }

    /// Bytes held, counted afresh (after groups left `pending`).
    fn held(&self) -> usize {
        self.pending
            .values()
            .flat_map(|p| p.frames.values())
            .map(|f| f.data.len() + FRAME_OVERHEAD)
            .sum()
    }

    fn deliver_current(&mut self, idx: u64, frame: Frame, out: &mut Vec<Frame>) -> Verdict {
        let contiguous = idx == self.next_idx && !self.broken;
        // Audio frames decode alone; video needs every frame since the keyframe.
        if contiguous || self.track == TrackKind::Audio {
            self.next_idx = idx + 1;
            out.push(frame);
            Verdict::Delivered
        } else {
            self.broken = true;
            self.next_idx = idx + 1;
            Verdict::Late
        }
    }

    /// Makes `seq` the current group and releases whatever is held for it (and for following
    /// groups that already finished).
    fn jump(&mut self, seq: u64, now_us: u64, out: &mut Vec<Frame>) {
        self.progress_us = Some(now_us);
        self.current = seq;
        self.next_idx = 0;
        self.broken = false;
        self.pending = self.pending.split_off(&seq);
        loop {
            let Some(p) = self.pending.remove(&self.current) else {
                self.held_bytes = self.held();
                return;
            };
            for (idx, f) in p.frames {
                self.deliver_current(idx, f, out);
            }
            if !p.finished {
                self.held_bytes = self.held();
                return;
            }
            self.current += 1;
            self.next_idx = 0;
            self.broken = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f(dts: i64) -> Frame {
        Frame {
            track: TrackKind::Video,
            dts,
            pts: dts,
            keyframe: false,
            arrival_us: 0,
            data: Bytes::new(),
        }
    }
    fn dts(v: &[Frame]) -> Vec<i64> {
        v.iter().map(|f| f.dts).collect()
    }

    #[test]
    fn newer_group_waits_for_older_to_finish() {
        let mut o = TrackOrder::new(TrackKind::Video, 0, 500_000);
        let mut out = vec![];
        assert_eq!(o.offer(0, 0, f(0), 0, &mut out), Verdict::Delivered);
        assert_eq!(o.offer(1, 0, f(100), 10, &mut out), Verdict::Held);
        assert_eq!(o.offer(0, 1, f(33), 20, &mut out), Verdict::Delivered);
        assert_eq!(o.offer(1, 1, f(133), 30, &mut out), Verdict::Held);
        o.finish(0, 40, &mut out);
        assert_eq!(dts(&out), vec![0, 33, 100, 133]);
        assert_eq!(o.position(), (1, 2));
    }

    #[test]
    fn stalled_group_is_abandoned_after_max_wait() {
        let mut o = TrackOrder::new(TrackKind::Video, 0, 500_000);
        let mut out = vec![];
        o.offer(0, 0, f(0), 0, &mut out);
        assert_eq!(o.offer(1, 0, f(100), 100_000, &mut out), Verdict::Held);
        assert_eq!(o.offer(1, 1, f(133), 700_000, &mut out), Verdict::Delivered);
        assert_eq!(dts(&out), vec![0, 100, 133]);
        // The straggler of group 0 is now late.
        assert_eq!(o.offer(0, 1, f(33), 800_000, &mut out), Verdict::Late);
    }

    #[test]
    fn finished_empty_groups_are_passed_and_resends_deduplicated() {
        let mut o = TrackOrder::new(TrackKind::Video, 5, 500_000);
        let mut out = vec![];
        o.finish(6, 0, &mut out); // a group with no frames of this track, finished early
        assert_eq!(o.offer(7, 0, f(700), 0, &mut out), Verdict::Held);
        o.finish(5, 0, &mut out);
        assert_eq!(dts(&out), vec![700]);
        assert_eq!(o.offer(7, 0, f(700), 0, &mut out), Verdict::Duplicate);
        assert_eq!(o.offer(7, 1, f(733), 0, &mut out), Verdict::Delivered);
        // Resume: a new sender starts again at group 7: duplicates dropped, the rest delivered.
        o.restart(7, 0, &mut out);
        assert_eq!(o.offer(7, 0, f(700), 0, &mut out), Verdict::Duplicate);
        assert_eq!(o.offer(7, 2, f(766), 0, &mut out), Verdict::Delivered);
        // A sender that restarts later skips the rest of group 7.
        o.restart(9, 0, &mut out);
        assert_eq!(o.offer(8, 0, f(800), 0, &mut out), Verdict::Late);
        assert_eq!(o.offer(9, 0, f(900), 0, &mut out), Verdict::Delivered);
    }

    #[test]
    fn video_gap_breaks_the_group_until_the_next() {
        let mut o = TrackOrder::new(TrackKind::Video, 0, 500_000);
        let mut out = vec![];
        o.offer(0, 0, f(0), 0, &mut out);
        assert_eq!(o.offer(0, 2, f(66), 0, &mut out), Verdict::Late);
        assert_eq!(o.offer(0, 3, f(99), 0, &mut out), Verdict::Late);
        o.finish(0, 40, &mut out);
        assert_eq!(o.offer(1, 0, f(100), 0, &mut out), Verdict::Delivered);
        let mut a = TrackOrder::new(TrackKind::Audio, 0, 500_000);
        a.offer(0, 0, f(0), 0, &mut out);
        assert_eq!(a.offer(0, 2, f(46), 0, &mut out), Verdict::Delivered);
    }

    #[test]
    fn held_frames_are_bounded_in_bytes() {
        let mut o = TrackOrder::new(TrackKind::Audio, 0, u64::MAX);
        let mut out = vec![];
        o.offer(0, 0, f(0), 0, &mut out);
        // Group 0 never finishes; a later group is sent ahead at full speed.
        let big = Bytes::from(vec![0u8; 1 << 20]);
        for i in 0..200u64 {
            let mut fr = f(1000 + i as i64);
            fr.data = big.clone();
            o.offer(1, i, fr, 0, &mut out);
            assert!(o.held_bytes <= MAX_HELD_BYTES + (1 << 20) + FRAME_OVERHEAD);
        }
        // Group 0 was given up and group 1 delivered.
        assert_eq!(o.position().0, 1);
        assert!(out.len() > 60);
        assert_eq!(o.held_bytes, o.held());
    }

    #[test]
    fn an_empty_later_group_does_not_cut_the_wait_short() {
        let mut o = TrackOrder::new(TrackKind::Video, 0, 500_000);
        let mut out = vec![];
        o.offer(0, 0, f(0), 0, &mut out);
        // Group 1 was skipped by the edge (an empty stream) while group 0's tail is being
        // retransmitted; group 2 starts a second later.
        o.finish(1, 1_000_000, &mut out);
        assert_eq!(o.offer(2, 0, f(200), 1_000_100, &mut out), Verdict::Held);
        assert_eq!(
            o.offer(0, 1, f(33), 1_100_000, &mut out),
            Verdict::Delivered
        );
        o.finish(0, 1_200_000, &mut out);
        assert_eq!(dts(&out), vec![0, 33, 200]);
    }

    #[test]
    fn a_sender_far_ahead_is_followed_once_the_current_group_stalled() {
        let mut o = TrackOrder::new(TrackKind::Video, 0, 500_000);
        let mut out = vec![];
        o.offer(0, 0, f(0), 0, &mut out);
        let far = MAX_AHEAD_GROUPS + 50;
        // Within the wait: refused, not held.
        assert_eq!(o.offer(far, 0, f(9000), 100_000, &mut out), Verdict::Late);
        assert!(o.pending.is_empty());
        // The current group made no progress for the whole wait: follow the sender.
        assert_eq!(
            o.offer(far, 0, f(9000), 600_001, &mut out),
            Verdict::Delivered
        );
        assert_eq!(
            o.offer(far, 1, f(9033), 600_002, &mut out),
            Verdict::Delivered
        );
        assert_eq!(o.position(), (far, 2));
    }

    #[test]
    fn groups_far_ahead_are_refused() {
        let mut o = TrackOrder::new(TrackKind::Video, 10, 500_000);
        let mut out = vec![];
        assert_eq!(
            o.offer(10 + MAX_AHEAD_GROUPS + 1, 0, f(0), 0, &mut out),
            Verdict::Late
        );
        for seq in 11..100_000 {
            o.finish(seq, 0, &mut out);
        }
        assert!(o.pending.len() as u64 <= MAX_AHEAD_GROUPS);
        assert_eq!(
            o.offer(10 + MAX_AHEAD_GROUPS, 0, f(0), 0, &mut out),
            Verdict::Held
        );
    }
}
