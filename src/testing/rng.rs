//! A small deterministic random generator for tests and simulations (no
//! `rand` dependency): the same seed always gives the same sequence, so a
//! failing run can be replayed from its seed.

/// A small deterministic generator (SplitMix64): the same seed gives the
/// same sequence on every platform.
///
/// ```
/// use stripe_webhook_guard::testing::Rng;
///
/// let (mut a, mut b) = (Rng::new(42), Rng::new(42));
/// assert_eq!(a.below(100), b.below(100));
/// let mut deck: Vec<u32> = (0..10).collect();
/// a.shuffle(&mut deck);
/// assert_eq!(deck.len(), 10);
/// ```
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `p` (in per-mille resolution).
    pub fn chance(&mut self, p: f64) -> bool {
        let per_mille = (p.clamp(0.0, 1.0) * 1000.0).round();
        // In 0..=1000, so the cast is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let per_mille = per_mille as u64;
        self.below(1000) < per_mille
    }

    /// Shuffles a slice in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = usize::try_from(self.below(i as u64 + 1)).unwrap_or(0);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spread() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let xs: Vec<u64> = (0..100).map(|_| a.below(10)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        for v in 0..10 {
            assert!(xs.contains(&v));
        }
        let mut items: Vec<u32> = (0..50).collect();
        a.shuffle(&mut items);
        let mut sorted = items.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(items, sorted);
        assert!(!a.chance(0.0));
        assert!(a.chance(1.0));
    }
}
