//! On-disk record format of the durable queue and its recovery scan (pure).
//!
//! ```text
//! frame   = MAGIC (4) | len: u32 LE (4) | crc: u32 LE (4) | payload (len bytes)
//! crc     = CRC32(len bytes ++ payload)            -- a corrupt length fails the CRC too
//! payload = flags: u8 | header_len: u32 LE | lines
//!           lines = header, or header "\n" data; flags bit 0: stateful, bit 1: has data
//! ```
//!
//! [`scan`] returns every intact frame of a segment. A frame that fails its checks is skipped by
//! searching forward for the next intact one (resync); what is left at the end is the torn tail.

use std::ops::Range;

use crate::event::{Event, Kind};

pub const MAGIC: [u8; 4] = *b"WZQ1";
pub const FRAME_HEADER: usize = 12;
/// Largest payload: flags, header_len, `event::MAX_RECORD_BYTES` of lines (a corrupt length allocates no more).
pub const MAX_PAYLOAD: usize = 5 + crate::event::MAX_RECORD_BYTES;

const STATEFUL: u8 = 1;
const HAS_DATA: u8 = 2;

fn crc(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Appends one event's frame to `out`; returns the frame's length.
pub fn encode(event: &Event, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&((frame_len(event) - FRAME_HEADER) as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let flags =
        if event.kind == Kind::Stateful { STATEFUL } else { 0 } | if event.data().is_some() { HAS_DATA } else { 0 };
    out.push(flags);
    out.extend_from_slice(&(event.header().len() as u32).to_le_bytes());
    out.extend_from_slice(event.lines().as_bytes());
    let c = crc(&out[start + 4..start + 8], &out[start + FRAME_HEADER..]);
    out[start + 8..start + 12].copy_from_slice(&c.to_le_bytes());
    out.len() - start
}

/// Size of the frame [`encode`] would write.
pub fn frame_len(event: &Event) -> usize {
    FRAME_HEADER + 1 + 4 + event.lines().len()
}

/// Whether [`scan`] would accept the event's frame: the queue writes no other.
pub fn fits(event: &Event) -> bool {
    frame_len(event) <= FRAME_HEADER + MAX_PAYLOAD
}

/// Checks the frame at `pos`; returns its total length if intact.
fn frame_at(buf: &[u8], pos: usize) -> Option<usize> {
    let head = buf.get(pos..pos + FRAME_HEADER)?;
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if head[..4] != MAGIC || !(5..=MAX_PAYLOAD).contains(&len) {
        return None;
    }
    let payload = buf.get(pos + FRAME_HEADER..pos + FRAME_HEADER + len)?;
    let want = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    (crc(&head[4..8], payload) == want).then_some(FRAME_HEADER + len)
}

/// Decodes an intact frame (as returned by [`scan`]).
pub fn decode(frame: &[u8]) -> Option<Event> {
    let payload = frame.get(FRAME_HEADER..)?;
    let flags = *payload.first()?;
    let hlen = u32::from_le_bytes(payload.get(1..5)?.try_into().ok()?) as usize;
    let lines = std::str::from_utf8(payload.get(5..)?).ok()?;
    let header = lines.get(..hlen)?;
    let data = if flags & HAS_DATA != 0 { Some(lines.get(hlen + 1..)?) } else { None };
    let kind = if flags & STATEFUL != 0 { Kind::Stateful } else { Kind::Stateless };
    Some(Event::new(kind, header, data))
}

/// What [`scan`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scan {
    /// Byte ranges of intact frames, in order.
    pub frames: Vec<Range<usize>>,
    /// Where the last intact frame ends: appends continue here.
    pub valid_end: usize,
    /// Bytes skipped between intact frames (corruption in the middle).
    pub skipped: usize,
    /// Bytes after `valid_end` that hold no intact frame (a torn or garbage tail).
    pub torn: usize,
}

/// Finds every intact frame in `buf[from..]`.
pub fn scan(buf: &[u8], from: usize) -> Scan {
    let mut s = Scan { valid_end: from, ..Scan::default() };
    let mut pos = from;
    while pos < buf.len() {
        if let Some(len) = frame_at(buf, pos) {
            s.frames.push(pos..pos + len);
            pos += len;
            s.valid_end = pos;
            continue;
        }
        // Resync: the next position holding an intact frame.
        let next = (pos + 1..buf.len().saturating_sub(FRAME_HEADER - 1))
            .filter(|&p| buf[p..p + 4] == MAGIC)
            .find(|&p| frame_at(buf, p).is_some());
        let Some(p) = next else {
            s.torn = buf.len() - pos;
            break;
        };
        s.skipped += p - pos;
        pos = p;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> Vec<Event> {
        (0..5)
            .map(|i| {
                Event::new(
                    if i % 2 == 0 { Kind::Stateful } else { Kind::Stateless },
                    &format!(r#"{{"module":"inventory","id":"{i}"}}"#),
                    (i != 2).then(|| format!(r#"{{"n":{}}}"#, "x".repeat(i * 3))).as_deref(),
                )
            })
            .collect()
    }

    fn encoded() -> (Vec<u8>, Vec<Range<usize>>) {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for e in events() {
            let start = buf.len();
            let n = encode(&e, &mut buf);
            assert_eq!(n, frame_len(&e));
            ranges.push(start..start + n);
        }
        (buf, ranges)
    }

    fn decoded(buf: &[u8], s: &Scan) -> Vec<Event> {
        s.frames.iter().map(|r| decode(&buf[r.clone()]).expect("intact frame decodes")).collect()
    }

    #[test]
    fn round_trip() {
        let (buf, ranges) = encoded();
        let s = scan(&buf, 0);
        assert_eq!(s.frames, ranges);
        assert_eq!((s.valid_end, s.skipped, s.torn), (buf.len(), 0, 0));
        assert_eq!(decoded(&buf, &s), events());
        // Scanning from a frame boundary sees the rest.
        assert_eq!(scan(&buf, ranges[2].start).frames, ranges[2..].to_vec());
    }

    #[test]
    fn every_truncation_recovers_exactly_the_intact_prefix() {
        let (buf, ranges) = encoded();
        for cut in 0..=buf.len() {
            let s = scan(&buf[..cut], 0);
            let whole: Vec<_> = ranges.iter().filter(|r| r.end <= cut).cloned().collect();
            assert_eq!(s.frames, whole, "cut at {cut}");
            let end = whole.last().map_or(0, |r| r.end);
            assert_eq!(s.valid_end, end, "cut at {cut}");
            assert_eq!(s.torn, cut - end, "cut at {cut}");
            assert_eq!(s.skipped, 0);
        }
    }

    #[test]
    fn every_single_byte_flip_loses_at_most_the_frame_it_hit() {
        let (buf, ranges) = encoded();
        let all = events();
        for pos in 0..buf.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut b = buf.clone();
                b[pos] ^= mask;
                let s = scan(&b, 0);
                let hit = ranges.iter().position(|r| r.contains(&pos)).unwrap();
                let got = decoded(&b, &s);
                let want: Vec<Event> =
                    all.iter().enumerate().filter(|(i, _)| *i != hit).map(|(_, e)| e.clone()).collect();
                assert_eq!(got, want, "flip {mask:#x} at {pos} (frame {hit})");
                // Every intact frame keeps its place; nothing is invented.
                let kept: Vec<_> =
                    ranges.iter().enumerate().filter(|(i, _)| *i != hit).map(|(_, r)| r.clone()).collect();
                assert_eq!(s.frames, kept, "flip {mask:#x} at {pos}");
            }
        }
    }

    /// The writer's limit is the reader's: the largest record that fits is read back, one byte
    /// more does not fit (the queue refuses it instead of acknowledging what it would skip).
    #[test]
    fn the_largest_record_that_fits_is_read_back() {
        let header = r#"{"module":"m"}"#;
        let sized = |n: usize| Event::new(Kind::Stateless, header, Some(&"x".repeat(n - header.len() - 1)));
        let (max, over) = (sized(crate::event::MAX_RECORD_BYTES), sized(crate::event::MAX_RECORD_BYTES + 1));
        assert_eq!(max.lines().len(), crate::event::MAX_RECORD_BYTES);
        assert!(fits(&max) && !fits(&over));
        for (e, readable) in [(max, true), (over, false)] {
            let mut buf = Vec::new();
            encode(&e, &mut buf);
            assert_eq!(scan(&buf, 0).frames.len(), usize::from(readable));
        }
    }

    #[test]
    fn garbage_and_zeroes_never_panic_and_yield_nothing() {
        for buf in [vec![0u8; 100], vec![0xff; 100], b"WZQ1\xff\xff\xff\xff".to_vec(), b"WZQ1".repeat(10)] {
            let s = scan(&buf, 0);
            assert!(s.frames.is_empty());
            assert_eq!(s.valid_end, 0);
        }
    }
}
