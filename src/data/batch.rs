//! Turning examples into rectangular batches: shifting inputs against targets, then either
//! packing several examples into fixed-length rows or padding length-grouped rows.
//!
//! Packing wastes no compute on padding; each example keeps its own RoPE positions and segment
//! id, and the model's block-diagonal causal mask stops attention across examples, so a packed
//! row trains exactly like the examples one by one. Padding mode keeps one example per row and
//! groups similar lengths so that little of each batch is padding.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::Example;

/// A batch ready for the model; all `Vec`s are row-major `[batch, seq]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    /// Input tokens (0 at padding).
    pub ids: Vec<u32>,
    /// The next token for each input position (0 where there is no target).
    pub targets: Vec<u32>,
    /// 1.0 where `targets[i]` counts in the loss.
    pub loss_mask: Vec<f32>,
    /// RoPE positions: restart at 0 at the start of every packed example (0 at padding).
    pub positions: Vec<u32>,
    /// Attention only within equal segment ids. Every padding position has a segment of its
    /// own, distinct from every real example, so it attends only to itself (a fully masked
    /// row would make the softmax NaN).
    pub segments: Vec<u32>,
    /// Number of 1.0 in `loss_mask`.
    pub tokens: usize,
}

/// An example shifted for next-token prediction: `inputs[i]` predicts `targets[i]`.
struct Shifted<'a> {
    inputs: &'a [u32],
    targets: &'a [u32],
    mask: &'a [bool],
}

/// One row under construction.
#[derive(Default)]
struct Row {
    ids: Vec<u32>,
    targets: Vec<u32>,
    mask: Vec<f32>,
    positions: Vec<u32>,
    segments: Vec<u32>,
    next_segment: u32,
}

impl Row {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn push(&mut self, ex: &Shifted) {
        let segment = self.next_segment;
        self.next_segment += 1;
        self.ids.extend_from_slice(ex.inputs);
        self.targets.extend_from_slice(ex.targets);
        self.mask.extend(ex.mask.iter().map(|&m| if m { 1.0 } else { 0.0 }));
        self.positions.extend(0..ex.inputs.len() as u32);
        self.segments.extend(std::iter::repeat_n(segment, ex.inputs.len()));
    }

    fn pad_to(&mut self, len: usize) {
        let n = len.saturating_sub(self.len());
        self.ids.extend(std::iter::repeat_n(0, n));
        self.targets.extend(std::iter::repeat_n(0, n));
        self.mask.extend(std::iter::repeat_n(0.0, n));
        self.positions.extend(std::iter::repeat_n(0, n));
        self.segments.extend(self.next_segment..self.next_segment + n as u32);
        self.next_segment += n as u32;
    }
}

/// Shifts each example (inputs `ids[..n-1]`, targets `ids[1..]`, loss mask `train_mask[1..]`)
/// and batches them; examples longer than `max_seq_len + 1` tokens are truncated (loading
/// says how many).
///
/// `packing`: examples (in order, after the optional seeded shuffle) are packed greedily into
/// rows of exactly `max_seq_len` positions (fewer when the examples hold fewer tokens in all),
/// the rest of a row padded, `batch_size` rows a batch.
/// Otherwise one example a row: after the optional shuffle, chunks of `32 * batch_size`
/// examples are sorted by length and cut into batches, each padded to its longest row, and the
/// batch order is shuffled with the same seed. The last batch may have fewer rows.
/// `shuffle_seed` None keeps file order (for evaluation).
pub fn make_batches(
    examples: &[Example],
    batch_size: usize,
    max_seq_len: usize,
    packing: bool,
    shuffle_seed: Option<u64>,
) -> Vec<Batch> {
    let batch_size = batch_size.max(1);
    let max_seq_len = max_seq_len.max(1);
    let mut shifted: Vec<Shifted> = examples
        .iter()
        .filter_map(|ex| {
            // A single token has nothing to predict.
            let n = ex.ids.len().min(ex.train_mask.len());
            if n < 2 {
                return None;
            }
            let keep = n.min(max_seq_len + 1);
            Some(Shifted { inputs: &ex.ids[..keep - 1], targets: &ex.ids[1..keep], mask: &ex.train_mask[1..keep] })
        })
        .collect();
    let mut rng = shuffle_seed.map(StdRng::seed_from_u64);
    if let Some(rng) = rng.as_mut() {
        shifted.shuffle(rng);
    }

    if packing {
        // Rows as long as `max_seq_len`, unless the whole dataset holds fewer tokens: a handful
        // of examples under a long `max_seq_len` should not pay for positions that can hold
        // nothing. Either way one length for every batch of every epoch.
        let row_len = max_seq_len.min(shifted.iter().map(|ex| ex.inputs.len()).sum::<usize>().max(1));
        let mut rows = Vec::new();
        let mut row = Row::default();
        for ex in &shifted {
            if row.len() + ex.inputs.len() > row_len {
                row.pad_to(row_len);
                rows.push(std::mem::take(&mut row));
            }
            row.push(ex);
        }
        if row.len() > 0 {
            row.pad_to(row_len);
            rows.push(row);
        }
        return rows.chunks(batch_size).map(|rows| assemble(rows, row_len)).collect();
    }

    let mut batches = Vec::new();
    for chunk in shifted.chunks_mut(32 * batch_size) {
        // Stable, so that equal lengths keep their (shuffled or file) order.
        chunk.sort_by_key(|ex| ex.inputs.len());
        for group in chunk.chunks(batch_size) {
            let seq = group.iter().map(|ex| ex.inputs.len()).max().unwrap_or(0);
            batches.push(one_per_row(group, seq));
        }
    }
    if let Some(rng) = rng.as_mut() {
        batches.shuffle(rng);
    }
    batches
}

/// One example a row, in the order given, padded to the longest and never truncated: for
/// sequences the trainer made itself (GRPO rollouts, on-policy completions), whose rows it must
/// find again.
pub fn rows_in_order(examples: &[Example]) -> Batch {
    let shifted: Vec<Shifted> = examples
        .iter()
        .map(|ex| {
            let n = ex.ids.len().min(ex.train_mask.len());
            if n < 2 {
                return Shifted { inputs: &[], targets: &[], mask: &[] };
            }
            Shifted { inputs: &ex.ids[..n - 1], targets: &ex.ids[1..n], mask: &ex.train_mask[1..n] }
        })
        .collect();
    let seq = shifted.iter().map(|ex| ex.inputs.len()).max().unwrap_or(0).max(1);
    one_per_row(&shifted, seq)
}

/// A batch of one example a row, each padded to `seq`.
fn one_per_row(examples: &[Shifted], seq: usize) -> Batch {
    let rows: Vec<Row> = examples
        .iter()
        .map(|ex| {
            let mut row = Row::default();
            row.push(ex);
            row.pad_to(seq);
            row
        })
        .collect();
    assemble(&rows, seq)
}

/// Concatenates rows, all `seq` long, into a batch.
fn assemble(rows: &[Row], seq: usize) -> Batch {
    let n = rows.len() * seq;
    let mut b = Batch {
        batch: rows.len(),
        seq,
        ids: Vec::with_capacity(n),
        targets: Vec::with_capacity(n),
        loss_mask: Vec::with_capacity(n),
        positions: Vec::with_capacity(n),
        segments: Vec::with_capacity(n),
        tokens: 0,
    };
    for row in rows {
        debug_assert_eq!(row.len(), seq);
        b.ids.extend_from_slice(&row.ids);
        b.targets.extend_from_slice(&row.targets);
        b.loss_mask.extend_from_slice(&row.mask);
        b.positions.extend_from_slice(&row.positions);
        b.segments.extend_from_slice(&row.segments);
    }
    b.tokens = b.loss_mask.iter().filter(|&&m| m > 0.0).count();
    b
}
