//! The linear-scan reference classifier: obviously correct, never on the datapath.

use super::{Classifier, NO_MATCH};
use crate::key::FlowKey;
use crate::rule::Match;

/// Evaluates every match in order with the reference semantics of [`Match::matches`].
#[derive(Debug, Clone)]
pub struct Linear {
    matches: Vec<Match>,
}

impl Linear {
    pub fn build(matches: &[Match]) -> Linear {
        Linear {
            matches: matches.to_vec(),
        }
    }
}

impl Classifier for Linear {
    fn first_match(&self, key: &FlowKey, from: u32) -> u32 {
        self.matches
            .iter()
            .enumerate()
            .skip(from as usize)
            .find(|(_, m)| m.matches(key))
            .map_or(NO_MATCH, |(i, _)| i as u32)
    }

    fn memory_bytes(&self) -> usize {
        self.matches.capacity() * std::mem::size_of::<Match>()
    }
}
