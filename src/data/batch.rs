//! Batching: deterministic, resumable epoch shuffles and right-padded batches.
//!
//! Shuffles use our own SplitMix64 generator and Fisher–Yates, not `rand`'s `StdRng`, whose
//! stream may change between `rand` versions: a checkpoint taken with one build resumes the
//! same example order with any later one.

use serde::{Deserialize, Serialize};

use super::encode::{Example, IGNORE_INDEX};

/// A padded batch, row-major `[batch_size, seq_len]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, right-padded with the pad id.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` (not shifted), [`IGNORE_INDEX`] on padding and on
    /// positions not trained on.
    pub labels: Vec<i64>,
    /// Number of rows.
    pub batch_size: usize,
    /// Length of each row: the longest example in the batch.
    pub seq_len: usize,
    /// Number of positions that contribute to the shifted next-token loss: labels other than
    /// [`IGNORE_INDEX`] at sequence positions 1.. of each row. Normalize a summed loss by it
    /// (across accumulation steps too) to weight every target token equally.
    pub n_target_tokens: usize,
}

impl Batch {
    /// Builds a batch from examples (in order), right-padded to the longest with `pad_id`.
    pub fn collate(examples: &[&Example], pad_id: u32) -> Batch {
        let seq_len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let batch_size = examples.len();
        let mut input_ids = Vec::with_capacity(batch_size * seq_len);
        let mut labels = Vec::with_capacity(batch_size * seq_len);
        let mut n_target_tokens = 0;
        for ex in examples {
            let n = ex.len();
            input_ids.extend_from_slice(&ex.input_ids);
            input_ids.extend(std::iter::repeat_n(pad_id, seq_len - n));
            labels.extend(ex.labels.iter().take(n).copied());
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq_len - ex.labels.len().min(n)));
            n_target_tokens += ex.n_target_tokens();
        }
        Batch { input_ids, labels, batch_size, seq_len, n_target_tokens }
    }
}

/// Where a [`Batcher`] is: the epoch and how many examples of that epoch's order were
/// already handed out. Saved in checkpoints so a resumed run continues at the next batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    /// Epoch number, from 0.
    pub epoch: u64,
    /// Examples of this epoch already handed out.
    pub index: usize,
    /// Number of examples the batcher was built for (a resume with a different dataset is
    /// logged as a warning); 0 when unknown.
    #[serde(default)]
    pub n_examples: usize,
}

/// Hands out training batches: each epoch visits every example once, in an order shuffled
/// with seed `seed + epoch`; epochs follow each other without end. The last batch of an
/// epoch is smaller when `batch_size` does not divide the number of examples.
#[derive(Clone, Debug)]
pub struct Batcher {
    n_examples: usize,
    batch_size: usize,
    seed: u64,
    pad_id: u32,
    epoch: u64,
    index: usize,
    order: Vec<usize>,
}

impl Batcher {
    /// A batcher over `n_examples` examples, at the start of epoch 0. A `batch_size` of 0 is
    /// taken as 1.
    pub fn new(n_examples: usize, batch_size: usize, seed: u64, pad_id: u32) -> Self {
        let mut b =
            Batcher { n_examples, batch_size: batch_size.max(1), seed, pad_id, epoch: 0, index: 0, order: Vec::new() };
        b.order = b.epoch_order(0);
        b
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        shuffled_indices(self.n_examples, self.seed.wrapping_add(epoch))
    }

    /// The next batch of `examples`, which must be the slice of `n_examples` examples the
    /// batcher was built for. Moves to the next epoch (a new shuffle) when the current one
    /// is used up. An empty batch when there are no examples.
    pub fn next_batch(&mut self, examples: &[Example]) -> Batch {
        assert_eq!(
            examples.len(),
            self.n_examples,
            "Batcher::next_batch: the batcher was built for another example set"
        );
        if self.n_examples == 0 {
            return Batch::collate(&[], self.pad_id);
        }
        if self.index >= self.n_examples {
            self.epoch += 1;
            self.index = 0;
            self.order = self.epoch_order(self.epoch);
        }
        let end = (self.index + self.batch_size).min(self.n_examples);
        let rows: Vec<&Example> = self.order[self.index..end].iter().map(|&i| &examples[i]).collect();
        self.index = end;
        Batch::collate(&rows, self.pad_id)
    }

    /// The current position, to save in a checkpoint.
    pub fn state(&self) -> BatcherState {
        BatcherState { epoch: self.epoch, index: self.index, n_examples: self.n_examples }
    }

    /// Continues from a saved position: the next batch is the one that would have followed
    /// when the state was taken.
    pub fn restore(&mut self, s: BatcherState) {
        if s.n_examples != 0 && s.n_examples != self.n_examples {
            tracing::warn!(
                saved = s.n_examples,
                now = self.n_examples,
                "resuming batches over a different number of examples: the order will not match the original run"
            );
        }
        self.epoch = s.epoch;
        self.index = s.index.min(self.n_examples);
        self.order = self.epoch_order(self.epoch);
    }

    /// Batches per epoch (the last one may be smaller).
    pub fn steps_per_epoch(&self) -> usize {
        self.n_examples.div_ceil(self.batch_size)
    }

    /// The current epoch, from 0 (the epoch the next batch comes from, unless the current
    /// one is used up).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Examples per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The pad id used for batches.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// Validation batches: `examples` in their given order, `batch_size` at a time (0 is taken
/// as 1), right-padded with `pad_id`.
pub fn eval_batches(examples: &[Example], batch_size: usize, pad_id: u32) -> Vec<Batch> {
    examples.chunks(batch_size.max(1)).map(|chunk| Batch::collate(&chunk.iter().collect::<Vec<_>>(), pad_id)).collect()
}

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and fixed forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (Lemire 2019).
    fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// `0..n` in an order fixed by `seed` (Fisher–Yates with SplitMix64).
pub(crate) fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize) -> Vec<Example> {
        // Example i has i+1 tokens, ids 1000*i + position; labels mask position 0.
        (0..n)
            .map(|i| {
                let ids: Vec<u32> = (0..=i as u32).map(|p| 1000 * i as u32 + p).collect();
                let labels =
                    ids.iter().enumerate().map(|(p, &t)| if p == 0 { IGNORE_INDEX } else { i64::from(t) }).collect();
                Example { input_ids: ids, labels }
            })
            .collect()
    }

    fn row_ids(b: &Batch) -> Vec<u32> {
        (0..b.batch_size).map(|r| b.input_ids[r * b.seq_len] / 1000).collect()
    }

    #[test]
    fn splitmix64_matches_reference_values() {
        // Reference: the C implementation at https://prng.di.unimi.it/splitmix64.c, seed 0.
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a = shuffled_indices(100, 7);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffled_indices(100, 7));
        assert_ne!(a, shuffled_indices(100, 8));
        assert_ne!(a, sorted);
        assert!(shuffled_indices(0, 1).is_empty());
    }

    #[test]
    fn collate_pads_right_and_masks_padding() {
        let ex = examples(3);
        let b = Batch::collate(&[&ex[2], &ex[0]], 7);
        assert_eq!((b.batch_size, b.seq_len), (2, 3));
        assert_eq!(b.input_ids, [2000, 2001, 2002, 0, 7, 7]);
        assert_eq!(b.labels, [IGNORE_INDEX, 2001, 2002, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(b.n_target_tokens, 2);
    }

    #[test]
    fn epochs_cover_every_example_once_and_reshuffle() {
        let ex = examples(10);
        let mut b = Batcher::new(10, 4, 42, 0);
        assert_eq!(b.steps_per_epoch(), 3);
        let mut epochs = Vec::new();
        for _ in 0..2 {
            let mut seen = Vec::new();
            let sizes: Vec<usize> = (0..3)
                .map(|_| {
                    let batch = b.next_batch(&ex);
                    seen.extend(row_ids(&batch));
                    batch.batch_size
                })
                .collect();
            assert_eq!(sizes, [4, 4, 2]);
            let mut sorted = seen.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..10).collect::<Vec<u32>>());
            epochs.push(seen);
        }
        assert_ne!(epochs[0], epochs[1]);
        assert_eq!(b.epoch(), 1);
        let ids: Vec<u32> = shuffled_indices(10, 42).iter().map(|&i| i as u32).collect();
        assert_eq!(epochs[0], ids);
    }

    #[test]
    fn restore_resumes_at_the_next_batch() {
        let ex = examples(7);
        let mut a = Batcher::new(7, 3, 1, 0);
        let mut saved = None;
        let mut after = Vec::new();
        for step in 0..8 {
            let batch = a.next_batch(&ex);
            if step == 3 {
                saved = Some(serde_json::to_string(&a.state()).unwrap());
            }
            if step > 3 {
                after.push(batch);
            }
        }
        let state: BatcherState = serde_json::from_str(&saved.unwrap()).unwrap();
        let mut b = Batcher::new(7, 3, 1, 0);
        b.restore(state);
        let resumed: Vec<Batch> = (0..4).map(|_| b.next_batch(&ex)).collect();
        assert_eq!(resumed, after);
        // Old checkpoints without n_examples still load.
        let s: BatcherState = serde_json::from_str(r#"{"epoch": 2, "index": 1}"#).unwrap();
        assert_eq!(s.n_examples, 0);
    }

    #[test]
    fn eval_batches_keep_order() {
        let ex = examples(5);
        let batches = eval_batches(&ex, 2, 0);
        assert_eq!(batches.len(), 3);
        let order: Vec<u32> = batches.iter().flat_map(row_ids).collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
        assert_eq!(
            batches.iter().map(|b| b.n_target_tokens).sum::<usize>(),
            ex.iter().map(Example::n_target_tokens).sum::<usize>()
        );
        assert!(Batcher::new(0, 2, 0, 0).next_batch(&[]).input_ids.is_empty());
    }
}
