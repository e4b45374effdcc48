//! Turning a stream of token bytes into text deltas.
//!
//! Tokens do not respect character boundaries (byte-level BPE splits an emoji over
//! several tokens), so bytes are held until they form whole UTF-8 characters. Stop
//! strings can also span tokens, so text that could be the start of a stop string is
//! held back until it is clear either way; a matched stop string is never emitted.

/// Assembles deltas from token bytes, honouring stop strings.
#[derive(Debug)]
pub(crate) struct TextAssembler {
    pending_bytes: Vec<u8>,
    held: String,
    stops: Vec<String>,
}

/// What the assembler made of one more token.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Step {
    /// Text safe to show now (may be empty).
    pub(crate) delta: String,
    /// A stop string was found; generation should end.
    pub(crate) stopped: bool,
}

impl TextAssembler {
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            pending_bytes: Vec::new(),
            held: String::new(),
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) -> Step {
        self.pending_bytes.extend_from_slice(bytes);
        let complete = take_complete_utf8(&mut self.pending_bytes);
        self.held.push_str(&complete);
        if let Some(at) = self.stops.iter().filter_map(|stop| self.held.find(stop.as_str())).min() {
            let delta = self.held[..at].to_owned();
            self.held.clear();
            self.pending_bytes.clear();
            return Step { delta, stopped: true };
        }
        // Hold back the longest tail that could still grow into a stop string.
        let keep = self.stops.iter().map(|stop| longest_suffix_prefix(&self.held, stop)).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let delta = self.held[..cut].to_owned();
        self.held.drain(..cut);
        Step { delta, stopped: false }
    }

    /// Whatever is still held at the end of generation.
    pub(crate) fn finish(&mut self) -> String {
        let mut rest = std::mem::take(&mut self.held);
        if !self.pending_bytes.is_empty() {
            rest.push_str(&String::from_utf8_lossy(&self.pending_bytes));
            self.pending_bytes.clear();
        }
        rest
    }
}

/// Removes and returns the longest prefix of `bytes` that is whole UTF-8. Bytes that can
/// never become valid are replaced with U+FFFD; an incomplete tail is kept for later.
fn take_complete_utf8(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                out.push_str(text);
                bytes.clear();
                return out;
            }
            Err(err) => {
                let valid = err.valid_up_to();
                out.push_str(std::str::from_utf8(&bytes[..valid]).unwrap_or_default());
                match err.error_len() {
                    None => {
                        bytes.drain(..valid);
                        return out;
                    }
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        bytes.drain(..valid + bad);
                    }
                }
            }
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut asm = TextAssembler::new(&stops);
        let mut deltas = Vec::new();
        for piece in pieces {
            let step = asm.push(piece);
            deltas.push(step.delta);
            if step.stopped {
                return (deltas, true, String::new());
            }
        }
        (deltas, false, asm.finish())
    }

    #[test]
    fn split_multibyte_character_is_held_until_whole() {
        let emoji = "😀".as_bytes();
        let (deltas, _, rest) = run(&[], &[&emoji[..2], &emoji[2..], b"!"]);
        assert_eq!(deltas, vec!["", "😀", "!"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (deltas, _, _) = run(&[], &[b"a\xffb"]);
        assert_eq!(deltas, vec!["a\u{FFFD}b"]);
    }

    #[test]
    fn stop_string_across_tokens_is_not_emitted() {
        let (deltas, stopped, _) = run(&["END"], &[b"hello E", b"N", b"D more"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "hello ");
    }

    #[test]
    fn false_start_of_stop_string_is_released() {
        let (deltas, stopped, rest) = run(&["END"], &[b"an E", b"ND", b"x"]);
        assert!(stopped);
        assert_eq!(deltas.concat() + &rest, "an ");
        let (deltas, stopped, rest) = run(&["END"], &[b"an E", b"x"]);
        assert!(!stopped);
        assert_eq!(deltas.concat() + &rest, "an Ex");
    }

    #[test]
    fn incomplete_tail_is_flushed_lossily_at_the_end() {
        let (_, _, rest) = run(&[], &[&"é".as_bytes()[..1]]);
        assert_eq!(rest, "\u{FFFD}");
    }
}
