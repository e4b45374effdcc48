//! Choosing the next token from logits.
//!
//! The chain follows llama.cpp's default order so the same parameters mean the same
//! thing in both: repetition penalty, then top-k, top-p and min-p (all measured on the
//! untempered distribution), then temperature, then a seeded random draw. Greedy
//! decoding (temperature 0 or top-k 1) skips the draw and takes the first maximum, so it
//! is deterministic and needs no RNG.

use std::collections::HashSet;

use kith_types::SamplingParams;

use crate::error::GenerateError;

/// Picks tokens for one generation; owns the seeded RNG state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    /// Validates `params` and seeds the RNG.
    pub fn new(params: SamplingParams) -> Result<Self, GenerateError> {
        let invalid = |msg: &str| Err(GenerateError::InvalidParams(msg.to_owned()));
        if !params.temperature.is_finite() || params.temperature < 0.0 {
            return invalid("temperature must be a finite number >= 0");
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return invalid("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&params.min_p) {
            return invalid("min_p must be in [0, 1]");
        }
        if !params.repeat_penalty.is_finite() || params.repeat_penalty <= 0.0 {
            return invalid("repeat_penalty must be a finite number > 0");
        }
        if params.max_tokens == 0 {
            return invalid("max_tokens must be at least 1");
        }
        let rng = SplitMix64(params.seed);
        Ok(Self { params, rng })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token. `logits` is modified (penalties applied); `history` holds
    /// the tokens seen so far, of which the last `repeat_last_n` are penalised.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_repeat_penalty(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(id, &l)| (id as u32, l)).collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        if self.params.top_k > 0 && self.params.top_k < candidates.len() {
            candidates.select_nth_unstable_by(self.params.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            candidates.truncate(self.params.top_k);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let probs = softmax(candidates.iter().map(|c| c.1));
        // top-p: the smallest prefix whose mass reaches p (at least one token).
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            let mut keep = candidates.len();
            for (idx, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.params.top_p {
                    keep = idx + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }
        // min-p: drop tokens less likely than min_p times the best one.
        if self.params.min_p > 0.0 {
            let threshold = probs[0] * self.params.min_p;
            let keep = probs.iter().take(candidates.len()).take_while(|&&p| p >= threshold).count().max(1);
            candidates.truncate(keep);
        }
        let temperature = self.params.temperature;
        let probs = softmax(candidates.iter().map(|c| c.1 / temperature));
        let draw = self.rng.next_f64() as f32;
        let mut acc = 0.0;
        for (candidate, p) in candidates.iter().zip(&probs) {
            acc += p;
            if draw < acc {
                return candidate.0;
            }
        }
        candidates.last().map(|c| c.0).unwrap_or_else(|| argmax(logits))
    }

    fn apply_repeat_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repeat_penalty;
        if penalty == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let start = history.len().saturating_sub(self.params.repeat_last_n);
        let seen: HashSet<u32> = history[start..].iter().copied().collect();
        for id in seen {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit = if *logit > 0.0 { *logit / penalty } else { *logit * penalty };
            }
        }
    }
}

/// Index of the first maximum (llama.cpp's greedy choice on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (idx, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = idx;
        }
    }
    best as u32
}

fn softmax(logits: impl Iterator<Item = f32> + Clone) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// A small, well-mixed 64-bit generator (Steele et al.); plenty for sampling and seedable.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    fn sample_many(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(p).expect("valid");
        (0..n).map(|_| sampler.sample(&mut logits.to_vec(), &[])).collect()
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(sample_many(SamplingParams::greedy(), &[1.0, 3.0, 3.0, 0.5], 3), vec![1, 1, 1]);
    }

    #[test]
    fn same_seed_same_draws_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = params(|p| {
            p.temperature = 1.5;
            p.top_k = 0;
            p.top_p = 1.0;
            p.min_p = 0.0;
            p.seed = 7;
        });
        let a = sample_many(p.clone(), &logits, 40);
        assert_eq!(a, sample_many(p.clone(), &logits, 40));
        let other = params(|o| {
            *o = p.clone();
            o.seed = 8;
        });
        assert_ne!(a, sample_many(other, &logits, 40));
    }

    #[test]
    fn top_k_limits_choices() {
        let logits = [5.0, 4.9, 1.0, 0.9, 0.8];
        let p = params(|p| {
            p.temperature = 5.0;
            p.top_k = 2;
            p.top_p = 1.0;
            p.min_p = 0.0;
        });
        assert!(sample_many(p, &logits, 200).iter().all(|&id| id < 2));
    }

    #[test]
    fn top_p_limits_choices() {
        // Token 0 alone holds over 90% of the mass.
        let logits = [10.0, 7.0, 6.0, 5.0];
        let p = params(|p| {
            p.temperature = 1.0;
            p.top_k = 0;
            p.top_p = 0.9;
            p.min_p = 0.0;
        });
        assert!(sample_many(p, &logits, 100).iter().all(|&id| id == 0));
    }

    #[test]
    fn min_p_limits_choices() {
        let logits = [2.0, 1.9, -3.0, -4.0];
        let p = params(|p| {
            p.temperature = 3.0;
            p.top_k = 0;
            p.top_p = 1.0;
            p.min_p = 0.5;
        });
        assert!(sample_many(p, &logits, 200).iter().all(|&id| id < 2));
    }

    #[test]
    fn repeat_penalty_changes_greedy_choice() {
        let mut p = SamplingParams::greedy();
        p.repeat_penalty = 2.0;
        let mut sampler = Sampler::new(p).expect("valid");
        assert_eq!(sampler.sample(&mut [3.0, 2.0], &[0]), 1);
    }

    #[test]
    fn invalid_parameters_are_refused() {
        for bad in [
            params(|p| p.temperature = -1.0),
            params(|p| p.top_p = 0.0),
            params(|p| p.min_p = 2.0),
            params(|p| p.repeat_penalty = 0.0),
            params(|p| p.max_tokens = 0),
        ] {
            assert!(matches!(Sampler::new(bad), Err(GenerateError::InvalidParams(_))));
        }
    }
}
