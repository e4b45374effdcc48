//! Memory candidates found in what the user says, on this machine, without a model.
//!
//! A small set of English statement openings ("my name is …", "I prefer …", "I live in
//! …", "my cat is called …", "I'm allergic to …") marks a clause as a fact about the
//! user, kept in the user's own words ("I live in Lyon"): recall matches a later question
//! ("Where do I live?") far better in the first person than in a paraphrase (MiniLM
//! cosine 0.48 against 0.27 for "The user lives in Lyon"). Questions, hypotheticals and
//! clauses opening otherwise are ignored: a missed fact costs little (the user can say
//! "remember that …"), a wrong one costs a review. Candidates wait in the review queue
//! until the user keeps, edits or discards them; they are never recalled before that.
//!
//! Rules rather than the chat model: the default model (135M parameters) does not
//! follow an extraction instruction reliably, and rules cost microseconds, not a second
//! of the engine the user is waiting on.

/// Candidates one message can produce at most.
const MAX_PER_MESSAGE: usize = 3;
/// Words a fact may have at most (longer clauses are not the kind of fact we keep).
const MAX_WORDS: usize = 14;

/// "my X is …" where X is one of these says nothing lasting about the user.
const TRANSIENT: &[&str] = &[
    "question", "problem", "issue", "point", "answer", "guess", "code", "mistake", "bad", "request", "turn", "idea",
    "plan", "message", "prompt", "output", "error", "test", "task", "job", "day", "week", "computer", "screen",
];

/// Openings of statements about the user, lower case.
const OPENINGS: &[&str] = &[
    "my name is ",
    "i'm called ",
    "i am called ",
    "call me ",
    "i prefer ",
    "i'd rather ",
    "i like ",
    "i love ",
    "i enjoy ",
    "i dislike ",
    "i hate ",
    "i don't like ",
    "i do not like ",
    "i live in ",
    "i'm from ",
    "i am from ",
    "i work at ",
    "i work for ",
    "i work as ",
    "i'm allergic to ",
    "i am allergic to ",
    "i speak ",
    "i was born ",
    "my pronouns are ",
];

/// Facts worth suggesting as memories in `message`, in the order they appear.
pub fn extract_candidates(message: &str) -> Vec<String> {
    if crate::turn::remember_request(message).is_some() {
        return Vec::new(); // saved directly, not suggested
    }
    let mut found: Vec<String> = Vec::new();
    for sentence in sentences(message) {
        for clause in clauses(sentence) {
            if let Some(fact) = fact(clause)
                && !found.iter().any(|f| f.eq_ignore_ascii_case(&fact))
            {
                found.push(fact);
            }
            if found.len() == MAX_PER_MESSAGE {
                return found;
            }
        }
    }
    found
}

/// Statements only: a sentence ending in `?` is skipped.
fn sentences(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            let end = rest.find(['.', '!', '?', ';', '\n']).map_or(rest.len(), |i| i + 1);
            let (sentence, tail) = rest.split_at(end);
            rest = tail;
            if sentence.ends_with('?') {
                continue;
            }
            let sentence = sentence.trim().trim_end_matches(['.', '!', ';']).trim();
            if !sentence.is_empty() {
                return Some(sentence);
            }
        }
    })
}

/// "My name is Ada and I prefer tea" holds two statements: split before an "and"/"but"
/// that starts a new one about the user.
fn clauses(sentence: &str) -> Vec<&str> {
    let lower = sentence.to_lowercase();
    if lower.len() != sentence.len() {
        return vec![sentence]; // case folding changed byte offsets: keep it whole
    }
    let mut cuts = vec![0];
    for joiner in [", and ", " and ", ", but ", " but ", ", "] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(joiner) {
            let start = from + at + joiner.len();
            let next = &lower[start..];
            if ["i ", "i'm ", "my "].iter().any(|p| next.starts_with(p)) {
                cuts.push(from + at);
                cuts.push(start);
            }
            from = start;
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut parts = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().skip(1) {
        if cut > start {
            parts.push(sentence[start..cut].trim());
        }
        start = cut;
    }
    parts.push(sentence[start..].trim());
    parts.retain(|p| !p.is_empty() && !["and", "but", ","].contains(&p.trim_matches(',').trim()));
    parts.into_iter().map(|p| p.trim_start_matches(',').trim()).collect()
}

fn fact(clause: &str) -> Option<String> {
    let lower = clause.to_lowercase();
    if lower.len() != clause.len() {
        return None;
    }
    let rest = match OPENINGS.iter().find_map(|opening| lower.strip_prefix(opening)) {
        Some(rest) => rest,
        None => {
            // "my cat is called Miso", "my favourite colour is blue", "my kids are Ann and Bo".
            let rest = lower.strip_prefix("my ")?;
            let (subject, verb) = [" is ", " are "].iter().filter_map(|v| rest.find(v).map(|i| (i, *v))).min()?;
            let subject_words: Vec<&str> = rest[..subject].split_whitespace().collect();
            if subject_words.is_empty()
                || subject_words.len() > 4
                || subject_words.iter().any(|w| TRANSIENT.contains(w))
            {
                return None;
            }
            &rest[subject + verb.len()..]
        }
    };
    let words = rest.split_whitespace().count();
    if words == 0 || words > MAX_WORDS {
        return None;
    }
    let clause = clause.trim().trim_end_matches([',', '.', '!']).trim();
    let mut chars = clause.chars();
    let first = chars.next()?;
    Some(first.to_uppercase().chain(chars).collect())
}

#[cfg(test)]
mod tests {
    use super::extract_candidates as extract;

    #[test]
    fn statements_about_the_user_become_facts() {
        assert_eq!(extract("My name is Ada."), ["My name is Ada"]);
        assert_eq!(extract("I prefer my coffee black"), ["I prefer my coffee black"]);
        assert_eq!(
            extract("My name is Ada and I live in Lyon. I'm allergic to peanuts!"),
            ["My name is Ada", "I live in Lyon", "I'm allergic to peanuts"]
        );
        assert_eq!(extract("my cat is called Miso"), ["My cat is called Miso"]);
        assert_eq!(
            extract("My favourite colour is blue, but I hate orange"),
            ["My favourite colour is blue", "I hate orange"]
        );
        assert_eq!(extract("Hello! I work as a nurse in Oslo."), ["I work as a nurse in Oslo"]);
    }

    #[test]
    fn questions_requests_and_small_talk_are_not_facts() {
        for message in [
            "What is my name?",
            "Do I like tea?",
            "Write a poem about the sea.",
            "My question is about Rust lifetimes",
            "If my name is Bob, what is yours",
            "Remember that my name is Ada",
            "I think I like it",
            "",
            "my is",
            "I like ",
        ] {
            assert!(extract(message).is_empty(), "{message:?} gave {:?}", extract(message));
        }
    }

    #[test]
    fn at_most_three_and_no_duplicates_and_no_panics_on_any_text() {
        let many = "I like tea. I like tea. I love cats. I live in Rome. I speak Welsh. I work at CERN.";
        assert_eq!(extract(many), ["I like tea", "I love cats", "I live in Rome"]);
        // Text whose case folding changes length, and multi-byte text.
        for text in ["İ like tea", "My name is Ådne", "私の名前はアダです", "my ß is ẞ", "I like 🍵 and I love 🐈"]
        {
            let _ = extract(text);
        }
        assert_eq!(extract("My name is Ådne"), ["My name is Ådne"]);
        assert_eq!(extract("I like 🍵 and I love 🐈"), ["I like 🍵", "I love 🐈"]);
        assert_eq!(extract("i live in Oslo"), ["I live in Oslo"]);
    }
}
