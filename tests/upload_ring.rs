//! The placement arithmetic of the CUDA upload ring that kiln patches into `cubecl-cuda`
//! (`vendor/cubecl-cuda/src/compute/ring_cursor.rs`, included here by path: that crate's own
//! tests need a GPU). A first version kept one position for the whole ring, and an upload that
//! filled a segment exactly sent the next one into the following segment without waiting for
//! its fence, or past the ring's end (a segmentation fault in `kiln bench sample` on CUDA).

#[path = "../vendor/cubecl-cuda/src/compute/ring_cursor.rs"]
mod ring_cursor;

use ring_cursor::RingCursor;

const SEGMENT: usize = 1 << 20;
const SEGMENTS: usize = 8;
const ALIGN: usize = 64;
const MAX_UPLOAD: usize = 16 * 1024;

/// Places `lens` in a fresh ring: every upload inside one segment of the ring, and every entry
/// into a segment (the wrap from the last to the first included) reported with the segment left.
fn check(what: &str, lens: impl IntoIterator<Item = usize>) -> usize {
    let mut cursor = RingCursor::new(SEGMENT, SEGMENTS);
    let (mut current, mut moves) = (0, 0);
    for (i, len) in lens.into_iter().enumerate() {
        let p = cursor.place(len);
        let segment = p.at / SEGMENT;
        assert!(p.at + len <= SEGMENT * SEGMENTS, "{what}: upload {i} ({len} bytes at {}) ends past the ring", p.at);
        assert_eq!((p.at + len - 1) / SEGMENT, segment, "{what}: upload {i} ({len} bytes at {}) crosses a segment", p.at);
        if segment == current {
            assert_eq!(p.moved, None, "{what}: upload {i} stays in segment {segment}");
        } else {
            assert_eq!(segment, (current + 1) % SEGMENTS, "{what}: upload {i} skipped a segment");
            assert_eq!(p.moved, Some((current, segment)), "{what}: upload {i} entered segment {segment} unreported");
            moves += 1;
        }
        current = segment;
    }
    moves
}

#[test]
fn uploads_stay_in_one_segment_and_every_segment_entered_is_reported() {
    let rounds = 3 * SEGMENTS;
    // Largest uploads fill each segment exactly: the case that crashed.
    assert_eq!(check("16 KiB", std::iter::repeat_n(MAX_UPLOAD, rounds * SEGMENT / MAX_UPLOAD + 1)), rounds);
    // Smallest uploads, also exact fills.
    assert_eq!(check("64 B", std::iter::repeat_n(ALIGN, rounds * SEGMENT / ALIGN + 1)), rounds);
    // Mixed sizes (aligned, as the ring rounds them), which leave gaps at segment ends.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mixed: Vec<usize> = (0..40_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (1 + (x % (MAX_UPLOAD / ALIGN) as u64) as usize) * ALIGN
        })
        .collect();
    assert!(check("mixed", mixed) >= SEGMENTS, "the mixed sizes should go round the ring");
}
