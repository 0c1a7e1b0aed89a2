//! The checker of generated answers: format validity, correctness and repetition, measured
//! separately so that a model can be right in a broken format, or well formatted and wrong.
//!
//! A completion (the generated text without the end-of-turn token) is **format-valid** when:
//!
//! 1. generation stopped at the end-of-turn token (not at the token limit);
//! 2. after removing trailing whitespace, its last line is exactly `Answer: <value>`: the
//!    word `Answer`, a colon, one space, then a value in the skill's canonical form, with no
//!    whitespace around it (integer: `-?[0-9]+` without leading zeros; sorting: integers
//!    joined by `, `; weekday: a capitalised English day name; date: a real `YYYY-MM-DD`;
//!    unit conversion: a decimal `[0-9]+(\.[0-9]+)?`);
//! 3. no other line starts with `Answer:` (any case, after leading whitespace).
//!
//! Lines before the answer line (a worked solution) are allowed.
//!
//! A completion is **correct** when the value of its last line that starts with `Answer:` (any
//! case, leading whitespace and a trailing period ignored) equals the expected answer: numbers
//! by value, lists element by element, weekdays ignoring case, dates as text. Correctness does
//! not need format validity.
//!
//! **Repetition** is the fraction of repeated word trigrams, `1 - distinct / total` over the
//! completion's whitespace-separated, lower-cased words (0 with fewer than three words): 0 for
//! text without a repeated trigram, close to 1 for a loop.

use serde::{Deserialize, Serialize};

use super::Skill;
use super::skills::{WEEKDAYS, days_in_month};

/// The verdict on one completion.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The strict format (see the module docs).
    pub format_valid: bool,
    /// The answer's value is right (leniently read).
    pub correct: bool,
    /// Fraction of repeated word trigrams, in [0, 1].
    pub repetition: f64,
}

/// Judges `completion` (without the end-of-turn token) against `answer` of `skill`; `ended`
/// tells whether generation stopped at the end-of-turn token.
pub fn check(skill: Skill, answer: &str, completion: &str, ended: bool) -> Verdict {
    Verdict {
        format_valid: ended && format_valid(skill, completion),
        correct: answer_value(completion).is_some_and(|v| same_value(skill, v, answer)),
        repetition: repetition(completion),
    }
}

fn starts_with_answer(line: &str) -> bool {
    line.trim_start().get(..7).is_some_and(|p| p.eq_ignore_ascii_case("answer:"))
}

fn format_valid(skill: Skill, completion: &str) -> bool {
    let lines: Vec<&str> = completion.trim_end().lines().collect();
    let Some((last, before)) = lines.split_last() else {
        return false;
    };
    let Some(value) = last.strip_prefix("Answer: ") else {
        return false;
    };
    canonical(skill, value) && !before.iter().any(|l| starts_with_answer(l))
}

/// The value of the last line that starts with `Answer:`, trimmed, without a trailing period.
fn answer_value(completion: &str) -> Option<&str> {
    let line = completion.lines().rev().find(|l| starts_with_answer(l))?;
    let value = line.trim_start()[7..].trim();
    Some(value.strip_suffix('.').unwrap_or(value).trim())
}

fn is_integer(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'))
}

fn is_decimal(v: &str) -> bool {
    match v.split_once('.') {
        Some((whole, frac)) => {
            is_integer(whole) && !whole.starts_with('-') && !frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit())
        }
        None => is_integer(v) && !v.starts_with('-'),
    }
}

fn is_date(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let [y, m, d] = parts[..] else {
        return false;
    };
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(y, 4) && digits(m, 2) && digits(d, 2)) {
        return false;
    }
    let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i32>(), m.parse::<u32>(), d.parse::<u32>()) else {
        return false;
    };
    (1..=12).contains(&m) && (1..=days_in_month(y, m)).contains(&d)
}

/// Whether `value` is in the skill's canonical form.
fn canonical(skill: Skill, value: &str) -> bool {
    match skill {
        Skill::Arithmetic | Skill::LetterCount => is_integer(value),
        Skill::Sorting => value.split(", ").all(is_integer),
        Skill::Weekday => WEEKDAYS.contains(&value),
        Skill::DateShift => is_date(value),
        Skill::UnitConversion => is_decimal(value),
    }
}

/// Whether `got` means `expected` for `skill` (leniently: numbers by value, any case).
fn same_value(skill: Skill, got: &str, expected: &str) -> bool {
    let number = |s: &str| s.trim().parse::<f64>().ok();
    match skill {
        Skill::Arithmetic | Skill::LetterCount | Skill::UnitConversion => {
            matches!((number(got), number(expected)), (Some(a), Some(b)) if (a - b).abs() <= 1e-9 * b.abs().max(1.0))
        }
        Skill::Sorting => {
            let list = |s: &str| s.split(',').map(|x| x.trim().parse::<i64>().ok()).collect::<Option<Vec<i64>>>();
            matches!((list(got), list(expected)), (Some(a), Some(b)) if a == b)
        }
        Skill::Weekday => got.eq_ignore_ascii_case(expected),
        Skill::DateShift => got == expected,
    }
}

/// `1 - distinct / total` word trigrams of `text` (0 with fewer than three words).
pub fn repetition(text: &str) -> f64 {
    let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
    if words.len() < 3 {
        return 0.0;
    }
    let trigrams: Vec<&[String]> = words.windows(3).collect();
    let distinct: std::collections::HashSet<&[String]> = trigrams.iter().copied().collect();
    1.0 - distinct.len() as f64 / trigrams.len() as f64
}
