//! The embedded default task: instruction-style prompts with computable answers in a fixed
//! format, so that quality and format validity are measured by a program.
//!
//! Each example is a chat turn in a tiny character-level vocabulary:
//!
//! ```text
//! prompt:     <bos> <user> add 37 58 <eot> <asst>
//! chosen:     <ans> 95 </ans> <eot>          correct and well formatted
//! rejected:   <ans> 96 </ans> <eot>          plausible wrong answer, same format
//! ```
//!
//! Chosen and rejected share every formatting token (`<ans>`, `</ans>`, `<eot>`), so an
//! objective that pushes rejected sequences down without anchoring the chosen ones also pushes
//! the format down: formatting collapse becomes measurable as the fraction of greedy
//! generations that are not exactly `<ans> ... </ans> <eot>`. Four skills (addition, sorting
//! digits, reversing, shifting letters) keep the task from being solvable by one pattern.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Special tokens of the task vocabulary, in id order.
pub const SPECIAL_TOKENS: [&str; 7] = ["<pad>", "<bos>", "<eot>", "<user>", "<asst>", "<ans>", "</ans>"];
/// Ordinary characters, ids following the special tokens.
pub const CHARACTERS: &str = "0123456789abcdefghijklmnopqrstuvwxyz ";

/// Token ids of the special tokens.
pub mod ids {
    /// Padding.
    pub const PAD: u32 = 0;
    /// Beginning of sequence.
    pub const BOS: u32 = 1;
    /// End of turn.
    pub const EOT: u32 = 2;
    /// User turn.
    pub const USER: u32 = 3;
    /// Assistant turn.
    pub const ASSISTANT: u32 = 4;
    /// Opens the answer.
    pub const ANS_OPEN: u32 = 5;
    /// Closes the answer.
    pub const ANS_CLOSE: u32 = 6;
}

/// Vocabulary size of the task tokenizer.
pub fn vocab_size() -> usize {
    SPECIAL_TOKENS.len() + CHARACTERS.len()
}

/// Character-level tokenizer of the task: special tokens are matched first, then characters.
#[derive(Debug, Clone, Default)]
pub struct TaskTokenizer;

impl TaskTokenizer {
    /// Token ids of `text`; `None` if it has a character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Option<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len());
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (id, special) in SPECIAL_TOKENS.iter().enumerate() {
                if let Some(tail) = rest.strip_prefix(special) {
                    out.push(id as u32);
                    rest = tail;
                    continue 'outer;
                }
            }
            let c = rest.chars().next()?;
            let pos = CHARACTERS.find(c)?;
            out.push((SPECIAL_TOKENS.len() + pos) as u32);
            rest = &rest[c.len_utf8()..];
        }
        Some(out)
    }

    /// Text of `ids`; unknown ids are written as `<unk:ID>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&id| {
                let i = id as usize;
                if i < SPECIAL_TOKENS.len() {
                    SPECIAL_TOKENS[i].to_string()
                } else {
                    CHARACTERS.chars().nth(i - SPECIAL_TOKENS.len()).map_or(format!("<unk:{id}>"), String::from)
                }
            })
            .collect()
    }
}

/// The four skills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Skill {
    /// `add 37 58` -> `95`.
    Add,
    /// `sort 4 1 3` -> `1 3 4`.
    Sort,
    /// `rev kqzt` -> `tzqk`.
    Reverse,
    /// `next abz` -> `bca` (each letter shifted by one, z wraps to a).
    Shift,
}

/// One preference pair as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPair {
    /// Which skill.
    pub skill: Skill,
    /// The instruction, e.g. `add 37 58`.
    pub instruction: String,
    /// The correct answer, e.g. `95`.
    pub answer: String,
    /// A plausible wrong answer.
    pub wrong: String,
}

impl TaskPair {
    /// The prompt in chat form: `<bos><user>{instruction}<eot><asst>`.
    pub fn prompt(&self) -> String {
        format!("<bos><user>{}<eot><asst>", self.instruction)
    }

    /// The chosen completion: `<ans>{answer}</ans><eot>`.
    pub fn chosen(&self) -> String {
        format_answer(&self.answer)
    }

    /// The rejected completion: `<ans>{wrong}</ans><eot>`.
    pub fn rejected(&self) -> String {
        format_answer(&self.wrong)
    }
}

/// `<ans>{content}</ans><eot>`.
pub fn format_answer(content: &str) -> String {
    format!("<ans>{content}</ans><eot>")
}

/// `count` pairs from `seed`, skills in rotation; the same seed gives the same pairs.
pub fn generate(count: usize, seed: u64) -> Vec<TaskPair> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|i| match i % 4 {
            0 => add(&mut rng),
            1 => sort(&mut rng),
            2 => reverse(&mut rng),
            _ => shift(&mut rng),
        })
        .collect()
}

fn letters(rng: &mut ChaCha8Rng, len: usize) -> String {
    (0..len).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect()
}

/// Replaces the character at `at` by a different letter.
fn mutate_letter(rng: &mut ChaCha8Rng, s: &str, at: usize) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| if i == at { char::from(b'a' + ((c as u8 - b'a' + rng.random_range(1..26u8)) % 26)) } else { c })
        .collect()
}

fn add(rng: &mut ChaCha8Rng) -> TaskPair {
    let (a, b) = (rng.random_range(10..100u32), rng.random_range(10..100u32));
    let sum = a + b;
    let off = rng.random_range(1..10u32);
    let wrong = if rng.random_bool(0.5) { sum + off } else { sum - off.min(sum - 1) };
    TaskPair {
        skill: Skill::Add,
        instruction: format!("add {a} {b}"),
        answer: sum.to_string(),
        wrong: wrong.to_string(),
    }
}

fn sort(rng: &mut ChaCha8Rng) -> TaskPair {
    let n = rng.random_range(3..6usize);
    let mut digits: Vec<u32> = (0..n).map(|_| rng.random_range(0..10u32)).collect();
    // At least two distinct digits, so a swapped answer is wrong.
    if digits.iter().all(|&d| d == digits[0]) {
        digits[0] = (digits[0] + 1) % 10;
    }
    let join = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    let mut sorted = digits.clone();
    sorted.sort_unstable();
    let mut wrong = sorted.clone();
    let i = (0..n - 1).find(|&i| wrong[i] != wrong[i + 1]).unwrap_or(0);
    wrong.swap(i, i + 1);
    TaskPair {
        skill: Skill::Sort,
        instruction: format!("sort {}", join(&digits)),
        answer: join(&sorted),
        wrong: join(&wrong),
    }
}

fn reverse(rng: &mut ChaCha8Rng) -> TaskPair {
    let len = rng.random_range(3..7usize);
    let word = letters(rng, len);
    let answer: String = word.chars().rev().collect();
    let wrong = if answer != word && rng.random_bool(0.5) {
        word.clone()
    } else {
        let at = rng.random_range(0..len);
        mutate_letter(rng, &answer, at)
    };
    TaskPair { skill: Skill::Reverse, instruction: format!("rev {word}"), answer, wrong }
}

fn shift(rng: &mut ChaCha8Rng) -> TaskPair {
    let len = rng.random_range(3..7usize);
    let word = letters(rng, len);
    let answer: String = word.chars().map(|c| char::from(b'a' + (c as u8 - b'a' + 1) % 26)).collect();
    let at = rng.random_range(0..len);
    let wrong = mutate_letter(rng, &answer, at);
    TaskPair { skill: Skill::Shift, instruction: format!("next {word}"), answer, wrong }
}

/// The verdict on one generated completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Exactly `<ans>`, answer characters, `</ans>`, `<eot>`, nothing else.
    pub format_valid: bool,
    /// The text between the first `<ans>` and the next `</ans>` (or `<eot>` / the end) equals
    /// the correct answer; judged leniently so quality and format are measured separately.
    pub correct: bool,
}

/// Judges a generated completion (the ids after `<asst>`, up to and including `<eot>` if any).
pub fn check(pair: &TaskPair, completion: &[u32]) -> Verdict {
    let is_char = |id: u32| id as usize >= SPECIAL_TOKENS.len();
    let format_valid = completion.len() >= 3
        && completion[0] == ids::ANS_OPEN
        && completion[completion.len() - 2] == ids::ANS_CLOSE
        && completion[completion.len() - 1] == ids::EOT
        && completion[1..completion.len() - 2].iter().all(|&id| is_char(id));
    let content: Vec<u32> = match completion.iter().position(|&id| id == ids::ANS_OPEN) {
        Some(start) => {
            completion[start + 1..].iter().copied().take_while(|&id| id != ids::ANS_CLOSE && id != ids::EOT).collect()
        }
        None => Vec::new(),
    };
    let correct = TaskTokenizer.decode(&content) == pair.answer;
    Verdict { format_valid, correct }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_answers_are_right() {
        let pairs = generate(400, 7);
        assert_eq!(pairs, generate(400, 7));
        assert_ne!(pairs, generate(400, 8));
        for p in &pairs {
            assert_ne!(p.answer, p.wrong, "{p:?}");
            let args: Vec<&str> = p.instruction.split(' ').skip(1).collect();
            let expected = match p.skill {
                Skill::Add => (args[0].parse::<u32>().expect("a") + args[1].parse::<u32>().expect("b")).to_string(),
                Skill::Sort => {
                    let mut d = args.clone();
                    d.sort_unstable();
                    d.join(" ")
                }
                Skill::Reverse => args[0].chars().rev().collect(),
                Skill::Shift => args[0].chars().map(|c| if c == 'z' { 'a' } else { char::from(c as u8 + 1) }).collect(),
            };
            assert_eq!(p.answer, expected, "{p:?}");
            // Same format, same vocabulary.
            for text in [p.prompt(), p.chosen(), p.rejected()] {
                assert!(TaskTokenizer.encode(&text).is_some(), "{text}");
            }
        }
    }

    #[test]
    fn tokenizer_round_trips() {
        let t = TaskTokenizer;
        let text = "<bos><user>add 12 34<eot><asst><ans>46</ans><eot>";
        let ids = t.encode(text).expect("encode");
        assert_eq!(ids[..2], [ids::BOS, ids::USER]);
        assert_eq!(t.decode(&ids), text);
        assert_eq!(t.encode("ADD"), None);
        assert!(ids.iter().all(|&i| (i as usize) < vocab_size()));
    }

    #[test]
    fn checker_separates_format_from_correctness() {
        let pair = generate(1, 0).remove(0);
        let enc = |s: &str| TaskTokenizer.encode(s).expect("encode");
        assert_eq!(check(&pair, &enc(&pair.chosen())), Verdict { format_valid: true, correct: true });
        assert_eq!(check(&pair, &enc(&pair.rejected())), Verdict { format_valid: true, correct: false });
        // Right answer, broken format (no closing tag).
        let broken = enc(&format!("<ans>{}<eot>", pair.answer));
        assert_eq!(check(&pair, &broken), Verdict { format_valid: false, correct: true });
        // Trailing garbage after <eot> is not a valid format; nothing at all is neither.
        let mut trailing = enc(&pair.chosen());
        trailing.push(ids::ANS_OPEN);
        assert!(!check(&pair, &trailing).format_valid);
        assert_eq!(check(&pair, &[]), Verdict { format_valid: false, correct: false });
    }
}
