//! kiln patch (KILN-PATCH.md): where the next upload goes in the upload ring (`upload_ring.rs`).
//! Plain arithmetic with no CUDA in it, kept apart so that kiln's own tests can include this
//! file and check it (`tests/upload_ring.rs`): this crate's test suite needs a GPU.

/// The write position in a ring of `segments` segments of `segment_bytes` bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingCursor {
    segment_bytes: usize,
    segments: usize,
    /// The segment uploads go to now, and the next free byte in it. Kept apart, not as one
    /// position in the ring: an upload that fills a segment to its last byte must leave the
    /// next one to the move below, which reports the segment entered (its fence must be waited
    /// for), never start it unreported or past the ring's end.
    segment: usize,
    offset: usize,
}

/// Where one upload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Its first byte, from the ring's start.
    pub at: usize,
    /// When it starts a new segment: the segment left (record its fence now) and the segment
    /// entered (wait for the fence it recorded when the ring last left it).
    pub moved: Option<(usize, usize)>,
}

impl RingCursor {
    pub const fn new(segment_bytes: usize, segments: usize) -> Self {
        Self { segment_bytes, segments, segment: 0, offset: 0 }
    }

    /// Places an upload of `len` bytes, at most one segment: it lies inside one segment.
    pub fn place(&mut self, len: usize) -> Placement {
        let mut moved = None;
        if self.offset + len > self.segment_bytes {
            let left = self.segment;
            self.segment = (self.segment + 1) % self.segments;
            self.offset = 0;
            moved = Some((left, self.segment));
        }
        let at = self.segment * self.segment_bytes + self.offset;
        self.offset += len;
        Placement { at, moved }
    }
}
