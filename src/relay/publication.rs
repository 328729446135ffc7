//! The edge's live publications: what ingest produced and the relay has yet to send.
//!
//! Each publication keeps its recent groups of pictures (a group starts at a video keyframe) in
//! a bounded buffer: at most `MAX_GROUPS` groups and a byte budget. Relay writers read from it at
//! their own pace; a writer whose group was evicted abandons it, so a slow or absent core never
//! makes ingest wait or memory grow. After a reconnect the relay resends from the newest group,
//! which starts at a keyframe.

use crate::config::DuplicatePolicy;
use crate::media::{AudioConfig, Frame, Metadata, StreamInfo, TrackKind, VideoConfig};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// A closed group is dropped, even if a writer still needs it, once it closed this long (wall
/// time) before the newest frame arrived: a writer that far behind skips to the newest group.
/// Measured in wall time, so a burst (an encoder catching up) is relayed whole.
pub const MAX_LAG_US: u64 = 4_000_000;
/// A sanity cap on groups held.
pub const MAX_GROUPS: usize = 64;
/// Audio with no video (yet) is cut into groups of this many milliseconds.
const AUDIO_ONLY_GROUP_MS: i64 = 2000;

/// Why a live publisher is disconnected from outside its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kick {
    /// Another publisher took the stream over (duplicate policy "replace").
    Replaced,
    /// The core refused the stream (another edge owns it, too many streams...).
    Refused(String),
}

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Buffered for the relay.
    Added,
    /// Dropped: video before the first keyframe, or the publication ended.
    Dropped,
    /// Not added: the open group alone would pass the byte budget (a keyframe interval too
    /// long for `relay.max_buffered_bytes`, or a publisher that never sends another keyframe).
    /// Eviction keeps the newest group whole, so this is the only bound on it: the caller
    /// ends the publication.
    GroupTooLarge {
        /// The group's size with this frame.
        bytes: usize,
        /// The budget.
        limit: usize,
    },
}

/// One group of pictures and the audio that arrived with it.
#[derive(Debug, Clone)]
pub struct Group {
    /// Sequence number within the publication.
    pub seq: u64,
    /// The stream info version its frames decode with.
    pub config_version: u64,
    /// Video frames; the first is a keyframe (unless the group holds only audio).
    pub video: Vec<Frame>,
    /// Audio frames.
    pub audio: Vec<Frame>,
    /// No more frames will be added.
    pub closed: bool,
    bytes: usize,
    /// Writers still sending this group; an unpinned, closed, older group is dropped.
    pins: usize,
    /// Arrival time of the frame that closed it (µs since the epoch).
    closed_at_us: u64,
    /// Arrival time of its first frame (µs since the epoch).
    opened_at_us: u64,
}

impl Group {
    fn frames(&self, track: TrackKind) -> &Vec<Frame> {
        match track {
            TrackKind::Video => &self.video,
            TrackKind::Audio => &self.audio,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    info: StreamInfo,
    info_version: u64,
    groups: VecDeque<Group>,
    next_seq: u64,
    bytes: usize,
    ended: bool,
    ever_sent: bool,
    evicted_unsent: u64,
    /// Groups below this have been handed to a sender (pinned) or skipped by it.
    /// Per track (video, audio): the sender has dealt with every group before this one.
    reached: [u64; 2],
    /// Arrival time of the newest frame.
    newest_arrival_us: u64,
}

/// What a reader gets for one track of one group.
#[derive(Debug)]
pub enum Read {
    /// Frames from the requested index on (possibly none yet), and whether the group is closed.
    Frames {
        /// New frames.
        frames: Vec<Frame>,
        /// The group is complete.
        closed: bool,
    },
    /// The group left the buffer: the reader fell too far behind.
    Evicted,
}

/// A snapshot for the relay sender.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Current stream info.
    pub info: StreamInfo,
    /// Its version.
    pub info_version: u64,
    /// Oldest and newest group sequence numbers held.
    pub groups: Option<(u64, u64)>,
    /// The publisher stopped.
    pub ended: bool,
}

/// One live stream at the edge.
pub struct Publication {
    /// Public stream name.
    pub name: String,
    /// Identifies this publishing session end to end (microseconds since the epoch at start).
    pub epoch: u64,
    state: Mutex<State>,
    version: watch::Sender<u64>,
    kicked: watch::Sender<Option<Kick>>,
    max_bytes: usize,
}

impl std::fmt::Debug for Publication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publication")
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Publication {
    /// A new, empty publication.
    pub fn new(name: &str, epoch: u64, max_bytes: usize) -> Self {
        Publication {
            name: name.to_string(),
            epoch,
            state: Mutex::new(State {
                info_version: 1,
                ..State::default()
            }),
            version: watch::channel(0).0,
            kicked: watch::channel(None).0,
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the buffer inconsistent in a way that
        // matters more than losing the stream; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Wakes on every change (frame, config, end).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Wakes when another publisher replaced this one.
    pub fn kicked(&self) -> watch::Receiver<Option<Kick>> {
        self.kicked.subscribe()
    }

    fn update_info(&self, f: impl FnOnce(&mut StreamInfo) -> bool) {
        let mut s = self.lock();
        if f(&mut s.info) {
            s.info_version += 1;
            drop(s);
            self.bump();
        }
    }

    /// A video sequence header.
    pub fn set_video_config(&self, c: VideoConfig) {
        self.update_info(|i| {
            let changed = i.video.as_ref() != Some(&c);
            i.video = Some(c);
            changed
        });
    }

    /// An audio sequence header.
    pub fn set_audio_config(&self, c: AudioConfig) {
        self.update_info(|i| {
            let changed = i.audio.as_ref() != Some(&c);
            i.audio = Some(c);
            changed
        });
    }

    /// onMetaData.
    pub fn set_metadata(&self, m: Metadata) {
        self.update_info(|i| {
            let changed = i.metadata != m;
            i.metadata = m;
            changed
        });
    }

    /// Adds a frame.
    pub fn push(&self, f: Frame) -> Pushed {
        let mut s = self.lock();
        if s.ended {
            return Pushed::Dropped;
        }
        let size = f.data.len() + 64;
        let start_new = match f.track {
            TrackKind::Video => f.keyframe,
            TrackKind::Audio => match s.groups.back() {
                None => true,
                Some(g) => {
                    g.video.is_empty()
                        && g.audio
                            .first()
                            .is_some_and(|a| f.dts - a.dts >= AUDIO_ONLY_GROUP_MS)
                }
            },
        };
        let now_us = f.arrival_us;
        if start_new {
            if let Some(g) = s.groups.back_mut() {
                g.closed = true;
                g.closed_at_us = now_us;
            }
            let seq = s.next_seq;
            s.next_seq += 1;
            let config_version = s.info_version;
            s.groups.push_back(Group {
                seq,
                config_version,
                video: vec![],
                audio: vec![],
                closed: false,
                bytes: 0,
                pins: 0,
                closed_at_us: 0,
                opened_at_us: now_us,
            });
        }
        // A video frame that is not a keyframe joins the open group: if that group began with
        // audio only, the frame cannot be decoded without its keyframe, so drop it.
        let max_bytes = self.max_bytes;
        let Some(g) = s.groups.back_mut() else {
            return Pushed::Dropped;
        };
        if f.track == TrackKind::Video && !f.keyframe && g.video.is_empty() {
            return Pushed::Dropped;
        }
        if g.bytes + size > max_bytes {
            return Pushed::GroupTooLarge {
                bytes: g.bytes + size,
                limit: max_bytes,
            };
        }
        g.bytes += size;
        match f.track {
            TrackKind::Video => g.video.push(f),
            TrackKind::Audio => g.audio.push(f),
        }
        s.bytes += size;
        s.newest_arrival_us = now_us;
        Self::evict(&mut s, self.max_bytes);
        drop(s);
        self.bump();
        Pushed::Added
    }

    /// Drops groups nobody needs: closed older groups that every writer is done with (once a
    /// sender has attached; before that they wait for it), then, past the hard limits, the
    /// oldest groups even if a writer still needs them (that writer skips ahead).
    fn evict(s: &mut State, max_bytes: usize) {
        if s.ever_sent {
            let newest = s.groups.back().map(|g| g.seq);
            let reached = s.reached[0].min(s.reached[1]);
            let mut freed = 0;
            s.groups.retain(|g| {
                let keep = g.pins > 0 || !g.closed || Some(g.seq) == newest || g.seq >= reached;
                if !keep {
                    freed += g.bytes;
                }
                keep
            });
            s.bytes -= freed;
        }
        let newest = s.newest_arrival_us;
        let too_old = |g: &Group| g.closed && newest.saturating_sub(g.closed_at_us) > MAX_LAG_US;
        while s.groups.len() > 1
            && (s.groups.len() > MAX_GROUPS
                || s.bytes > max_bytes
                || s.groups.front().is_some_and(too_old))
        {
            if let Some(old) = s.groups.pop_front() {
                s.bytes -= old.bytes;
                if !s.ever_sent {
                    s.evicted_unsent += 1;
                }
            }
        }
    }

    /// A writer starts on group `seq`; false if the group is gone.
    pub fn pin(&self, seq: u64) -> bool {
        let mut s = self.lock();
        match s.groups.iter_mut().find(|g| g.seq == seq) {
            Some(g) => {
                g.pins += 1;
                true
            }
            None => false,
        }
    }

    /// The sender has dealt with every group before `seq` for `track` (pinned it for a
    /// writer, or skipped it): groups both tracks passed are dropped once no writer pins them.
    pub fn reach(&self, track: TrackKind, seq: u64) {
        let mut s = self.lock();
        let t = match track {
            TrackKind::Video => 0,
            TrackKind::Audio => 1,
        };
        s.reached[t] = s.reached[t].max(seq);
        Self::evict(&mut s, self.max_bytes);
    }

    /// A writer is done with group `seq`.
    pub fn unpin(&self, seq: u64) {
        let mut s = self.lock();
        if let Some(g) = s.groups.iter_mut().find(|g| g.seq == seq) {
            g.pins = g.pins.saturating_sub(1);
        }
        Self::evict(&mut s, self.max_bytes);
    }

    /// Groups held (for tests and metrics).
    pub fn groups_held(&self) -> usize {
        self.lock().groups.len()
    }

    /// The publisher stopped: the last group closes and readers finish.
    pub fn end(&self) {
        let mut s = self.lock();
        s.ended = true;
        let now = s.newest_arrival_us;
        if let Some(g) = s.groups.back_mut() {
            g.closed = true;
            g.closed_at_us = now;
        }
        drop(s);
        self.bump();
    }

    /// Another publisher took the stream over (duplicate policy "replace").
    pub fn kick(&self) {
        self.stop(Kick::Replaced);
    }

    /// The core refused the stream: the publisher is disconnected with `reason`.
    pub fn refuse(&self, reason: String) {
        self.stop(Kick::Refused(reason));
    }

    fn stop(&self, why: Kick) {
        self.kicked.send_if_modified(|k| {
            let first = k.is_none();
            if first {
                *k = Some(why);
            }
            first
        });
        self.end();
    }

    /// The current state, for the sender.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            info: s.info.clone(),
            info_version: s.info_version,
            groups: s
                .groups
                .front()
                .zip(s.groups.back())
                .map(|(a, b)| (a.seq, b.seq)),
            ended: s.ended,
        }
    }

    /// Where a new sender starts: the oldest group for the first sender (nothing sent yet, so
    /// nothing is lost), else the newest group (resume from the last keyframe).
    /// With no group yet, the sequence number the first group will get. Also how many groups
    /// the previous sender never reached and the new one will not send (an outage's cost).
    pub fn start_seq(&self) -> (u64, u64) {
        let mut s = self.lock();
        let first = !s.ever_sent;
        s.ever_sent = true;
        let held = if first {
            s.groups.front()
        } else {
            s.groups.back()
        };
        let start = held.map_or(s.next_seq, |g| g.seq);
        let unsent = if first {
            0
        } else {
            start.saturating_sub(s.reached[0])
        };
        s.reached = [start, start];
        (start, unsent)
    }

    /// `f` of group `seq`, if it is held.
    fn with_group<T>(&self, seq: u64, f: impl FnOnce(&Group) -> T) -> Option<T> {
        self.lock().groups.iter().find(|g| g.seq == seq).map(f)
    }

    /// When group `seq`'s first frame arrived (µs since the epoch), if it is held.
    pub fn group_opened_us(&self, seq: u64) -> Option<u64> {
        self.with_group(seq, |g| g.opened_at_us)
    }

    /// The config version a group decodes with, if the group is held.
    pub fn group_config_version(&self, seq: u64) -> Option<u64> {
        self.with_group(seq, |g| g.config_version)
    }

    /// Frames of `track` in group `seq` from index `from` on.
    pub fn read(&self, seq: u64, track: TrackKind, from: usize) -> Read {
        let s = self.lock();
        match s.groups.iter().find(|g| g.seq == seq) {
            None => Read::Evicted,
            Some(g) => Read::Frames {
                frames: g.frames(track).get(from..).unwrap_or_default().to_vec(),
                closed: g.closed,
            },
        }
    }

    /// Buffered bytes (for tests and metrics).
    pub fn buffered_bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// A second publisher for a live stream under the "reject" policy.
#[derive(Debug, thiserror::Error)]
#[error("stream {0} is already being published")]
pub struct AlreadyLive(pub String);

/// All publications of an edge, by name.
pub struct Publications {
    map: Mutex<HashMap<String, Arc<Publication>>>,
    changed: watch::Sender<u64>,
    policy: DuplicatePolicy,
    max_bytes: usize,
}

impl Publications {
    /// An empty registry.
    pub fn new(policy: DuplicatePolicy, max_bytes: usize) -> Self {
        Publications {
            map: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            policy,
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Publication>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a publication named `name`, applying the duplicate policy.
    pub fn claim(&self, name: &str) -> Result<Arc<Publication>, AlreadyLive> {
        let mut m = self.lock();
        if let Some(old) = m.get(name) {
            match self.policy {
                DuplicatePolicy::Reject => return Err(AlreadyLive(name.to_string())),
                DuplicatePolicy::Replace => old.kick(),
            }
        }
        // Epochs must differ between publishing sessions of one name, also within a microsecond.
        let mut epoch = crate::media::now_unix_us();
        if let Some(old) = m.get(name) {
            epoch = epoch.max(old.epoch + 1);
        }
        let p = Arc::new(Publication::new(name, epoch, self.max_bytes));
        m.insert(name.to_string(), p.clone());
        drop(m);
        self.changed.send_modify(|v| *v += 1);
        Ok(p)
    }

    /// Ends `p` and removes it (if it is still the registered publication of its name).
    pub fn release(&self, p: &Arc<Publication>) {
        p.end();
        let mut m = self.lock();
        if m.get(&p.name).is_some_and(|cur| Arc::ptr_eq(cur, p)) {
            m.remove(&p.name);
        }
        drop(m);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Every live publication.
    pub fn list(&self) -> Vec<Arc<Publication>> {
        self.lock().values().cloned().collect()
    }

    /// Wakes when a publication starts or ends.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f(track: TrackKind, dts: i64, key: bool, size: usize) -> Frame {
        Frame {
            track,
            dts,
            pts: dts,
            keyframe: key,
            // Real time: arrival follows the timestamps.
            arrival_us: dts as u64 * 1000,
            data: Bytes::from(vec![0u8; size]),
        }
    }

    #[test]
    fn groups_start_at_keyframes_and_audio_before_video_is_kept() {
        let p = Publication::new("s", 1, 1 << 20);
        let added = |fr| p.push(fr) == Pushed::Added;
        assert!(added(f(TrackKind::Audio, 0, true, 10)));
        assert!(!added(f(TrackKind::Video, 0, false, 10))); // no keyframe yet
        assert!(added(f(TrackKind::Video, 10, true, 10)));
        assert!(added(f(TrackKind::Video, 43, false, 10)));
        assert!(added(f(TrackKind::Audio, 23, true, 10)));
        assert_eq!(p.snapshot().groups, Some((0, 1)));
        match p.read(0, TrackKind::Audio, 0) {
            Read::Frames { frames, closed } => {
                assert_eq!(frames.len(), 1);
                assert!(closed);
            }
            Read::Evicted => panic!(),
        }
        match p.read(1, TrackKind::Video, 1) {
            Read::Frames { frames, closed } => {
                assert_eq!(frames.len(), 1);
                assert!(!closed);
            }
            Read::Evicted => panic!(),
        }
    }

    #[test]
    fn bounded_by_groups_and_bytes() {
        let p = Publication::new("s", 1, 10_000);
        for i in 0..10 {
            p.push(f(TrackKind::Video, i * 1000, true, 100));
        }
        // Groups that closed more than 4 s before the newest frame are gone.
        assert_eq!(p.snapshot().groups, Some((4, 9)));
        // A burst (all arriving at once) is kept whole.
        let b = Publication::new("b", 1, 1 << 20);
        for i in 0..10 {
            let mut fr = f(TrackKind::Video, i * 1000, true, 100);
            fr.arrival_us = 42;
            b.push(fr);
        }
        assert_eq!(b.snapshot().groups, Some((0, 9)));
        assert!(matches!(p.read(0, TrackKind::Video, 0), Read::Evicted));
        // A big group evicts everything older but itself.
        p.push(f(TrackKind::Video, 20_000, true, 9_900));
        assert_eq!(p.snapshot().groups, Some((10, 10)));
        // A group that would pass the budget by itself is refused, whatever its frames are.
        assert_eq!(
            p.push(f(TrackKind::Video, 20_033, false, 1_000)),
            Pushed::GroupTooLarge {
                bytes: 9_964 + 1_064,
                limit: 10_000
            }
        );
        assert_eq!(
            p.push(f(TrackKind::Audio, 20_040, true, 2_000)),
            Pushed::GroupTooLarge {
                bytes: 9_964 + 2_064,
                limit: 10_000
            }
        );
        assert!(p.buffered_bytes() <= 10_000);
    }

    #[test]
    fn first_sender_starts_oldest_then_newest() {
        let p = Publication::new("s", 1, 1 << 20);
        for i in 0..3 {
            p.push(f(TrackKind::Video, i * 1000, true, 10));
        }
        assert_eq!(p.start_seq(), (0, 0));
        // Resuming at the newest group: the previous sender reached group 0 only.
        assert_eq!(p.start_seq(), (2, 2));
        let empty = Publication::new("e", 1, 1 << 20);
        assert_eq!(empty.start_seq(), (0, 0));
    }

    #[test]
    fn sent_groups_are_freed_once_their_writers_are_done() {
        let p = Publication::new("s", 1, 1 << 20);
        p.push(f(TrackKind::Video, 0, true, 10));
        assert_eq!(p.start_seq().0, 0);
        assert!(p.pin(0));
        p.reach(TrackKind::Audio, 1);
        p.reach(TrackKind::Video, 1);
        p.push(f(TrackKind::Video, 2000, true, 10));
        p.push(f(TrackKind::Video, 4000, true, 10));
        // Nothing is dropped before the sender reached it.
        assert_eq!(p.groups_held(), 3);
        assert!(p.pin(1));
        p.unpin(1);
        p.reach(TrackKind::Audio, 2);
        assert_eq!(
            p.groups_held(),
            3,
            "audio done first does not drop the group"
        );
        p.reach(TrackKind::Video, 2);
        // Group 0 is still pinned by its writer; group 1 is done.
        p.push(f(TrackKind::Video, 4033, false, 10));
        assert_eq!(p.snapshot().groups, Some((0, 2)));
        assert_eq!(p.groups_held(), 2);
        p.unpin(0);
        assert_eq!(p.groups_held(), 1);
        assert_eq!(p.snapshot().groups, Some((2, 2)));
    }

    #[test]
    fn duplicate_policies() {
        let r = Publications::new(DuplicatePolicy::Reject, 1 << 20);
        let a = r.claim("x").unwrap();
        assert_eq!(r.claim("x").err().map(|e| e.0), Some("x".to_string()));
        r.release(&a);
        assert!(r.claim("x").is_ok());

        let r = Publications::new(DuplicatePolicy::Replace, 1 << 20);
        let a = r.claim("x").unwrap();
        let kicked = a.kicked();
        let b = r.claim("x").unwrap();
        assert_eq!(*kicked.borrow(), Some(Kick::Replaced));
        assert!(a.snapshot().ended);
        assert!(b.epoch > a.epoch);
        r.release(&a); // the old one's release must not remove the new one
        assert_eq!(r.list().len(), 1);
    }
}
