//! The skills' problem generators: a natural-language question, its correct answer and a
//! plausible wrong answer (the mistake a solver typically makes), written as answer values.

use rand::Rng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;

use super::{Problem, Skill};

const NAMES: [&str; 12] =
    ["Maya", "Liam", "Noah", "Emma", "Ava", "Lucas", "Zoe", "Omar", "Priya", "Hugo", "Sofia", "Ken"];
const ITEMS: [&str; 8] = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "cards"];

/// Weekday names, Monday first.
pub const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Words for letter counting (lower case, several with repeated letters).
const WORDS: &[&str] = &[
    "strawberry",
    "banana",
    "mississippi",
    "committee",
    "balloon",
    "bookkeeper",
    "parallel",
    "necessary",
    "address",
    "accommodate",
    "tomorrow",
    "pepper",
    "coffee",
    "letter",
    "bottle",
    "giraffe",
    "hippopotamus",
    "umbrella",
    "window",
    "garden",
    "kitchen",
    "library",
    "elephant",
    "computer",
    "keyboard",
    "mountain",
    "river",
    "history",
    "science",
    "teacher",
    "student",
    "village",
    "picture",
    "weather",
    "holiday",
    "journey",
    "pattern",
    "success",
    "possession",
    "assessment",
    "millennium",
    "embarrass",
    "occurrence",
    "programming",
    "grammar",
    "summer",
    "winter",
    "autumn",
    "spring",
    "yellow",
    "orange",
    "purple",
    "cinnamon",
    "avocado",
    "pineapple",
    "raspberry",
    "blueberry",
    "cherry",
    "lemonade",
    "chocolate",
    "sandwich",
    "butterfly",
    "dragonfly",
    "caterpillar",
    "squirrel",
    "rabbit",
    "kangaroo",
    "penguin",
    "dolphin",
    "octopus",
    "tomato",
    "potato",
    "broccoli",
    "cucumber",
    "zucchini",
    "spaghetti",
    "lasagna",
    "pizza",
    "noodle",
    "cabbage",
    "carrot",
    "referee",
    "engineer",
    "volunteer",
    "gossip",
    "puzzle",
    "jazz",
    "reservoir",
    "labyrinth",
    "rhythm",
    "syllable",
    "alphabet",
    "sentence",
    "paragraph",
];

/// The instruction that ends every prompt, with the expected value's shape.
fn instruction(value: &str) -> String {
    format!("Reply with a single line of the form `Answer: {value}`.")
}

fn problem(skill: Skill, question: String, value: &str, answer: String, wrong: String, key: String) -> Problem {
    Problem {
        skill,
        prompt: format!("{question}\n\n{}", instruction(value)),
        answer,
        wrong,
        key: format!("{}:{key}", skill.name()),
    }
}

/// A wrong integer near `answer`: off by 1 to 10, never negative, never `answer`.
fn near_miss(rng: &mut ChaCha8Rng, answer: i64) -> i64 {
    let off = rng.random_range(1..=10i64);
    if answer - off < 0 || rng.random_bool(0.5) { answer + off } else { answer - off }
}

/// Arithmetic word problems (five templates); the wrong answer is a wrong operation's result
/// when that differs, else a near miss.
pub fn arithmetic(rng: &mut ChaCha8Rng) -> Problem {
    let name = *NAMES.choose(rng).unwrap_or(&NAMES[0]);
    let item = *ITEMS.choose(rng).unwrap_or(&ITEMS[0]);
    let template = rng.random_range(0..5u8);
    let (question, answer, slip, key) = match template {
        0 => {
            let (a, b) = (rng.random_range(5..60i64), rng.random_range(2..40i64));
            let c = rng.random_range(1..=a + b - 1);
            (
                format!(
                    "{name} has {a} {item}, buys {b} more and then gives {c} to a friend. How many {item} does {name} have now?"
                ),
                a + b - c,
                a + b + c,
                format!("{template}:{a}:{b}:{c}"),
            )
        }
        1 => {
            let (a, b) = (rng.random_range(3..25i64), rng.random_range(2..13i64));
            (
                format!("A shop sells {item} in boxes of {a}. {name} buys {b} boxes. How many {item} does {name} buy?"),
                a * b,
                a + b,
                format!("{template}:{a}:{b}"),
            )
        }
        2 => {
            let (each, friends) = (rng.random_range(2..20i64), rng.random_range(2..10i64));
            let total = each * friends;
            (
                format!(
                    "{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
                ),
                each,
                total - friends,
                format!("{template}:{total}:{friends}"),
            )
        }
        3 => {
            let (a, b, c) = (rng.random_range(10..90i64), rng.random_range(10..90i64), rng.random_range(10..90i64));
            (
                format!(
                    "{name} reads {a} pages on Monday, {b} pages on Tuesday and {c} pages on Wednesday. How many pages \
                     does {name} read in total?"
                ),
                a + b + c,
                a + b,
                format!("{template}:{a}:{b}:{c}"),
            )
        }
        _ => {
            let a = rng.random_range(20..120i64);
            let off = rng.random_range(1..a);
            let on = rng.random_range(1..40i64);
            (
                format!(
                    "A bus leaves the station with {a} passengers. At the first stop {off} passengers get off and \
                     {on} get on. How many passengers are on the bus now?"
                ),
                a - off + on,
                a + off - on,
                format!("{template}:{a}:{off}:{on}"),
            )
        }
    };
    let wrong = if slip != answer && slip >= 0 { slip } else { near_miss(rng, answer) };
    problem(Skill::Arithmetic, question, "<number>", answer.to_string(), wrong.to_string(), key)
}

/// Joins numbers as `a, b, c`.
pub fn join_numbers(values: &[u32]) -> String {
    values.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// Sorting 4 to 7 distinct numbers up or down; the wrong answer swaps two neighbours.
pub fn sorting(rng: &mut ChaCha8Rng) -> Problem {
    let n = rng.random_range(4..=7usize);
    let mut values: Vec<u32> = Vec::with_capacity(n);
    while values.len() < n {
        let v = rng.random_range(1..100u32);
        if !values.contains(&v) {
            values.push(v);
        }
    }
    let descending = rng.random_bool(0.5);
    let mut sorted = values.clone();
    sorted.sort_unstable();
    if descending {
        sorted.reverse();
    }
    let mut wrong = sorted.clone();
    let at = rng.random_range(0..n - 1);
    wrong.swap(at, at + 1);
    let order = if descending { "from largest to smallest" } else { "from smallest to largest" };
    let mut key_values = sorted.clone();
    key_values.sort_unstable();
    problem(
        Skill::Sorting,
        format!("Sort these numbers {order}: {}.", join_numbers(&values)),
        "<numbers separated by commas>",
        join_numbers(&sorted),
        join_numbers(&wrong),
        format!("{descending}:{}", join_numbers(&key_values)),
    )
}

/// Counting a letter in a word (usually one that occurs); the wrong answer is one off.
pub fn letter_count(rng: &mut ChaCha8Rng) -> Problem {
    let word = *WORDS.choose(rng).unwrap_or(&WORDS[0]);
    let letter = if rng.random_bool(0.85) {
        let letters: Vec<char> = word.chars().collect();
        *letters.choose(rng).unwrap_or(&'a')
    } else {
        char::from(b'a' + rng.random_range(0..26u8))
    };
    let count = word.chars().filter(|&c| c == letter).count() as i64;
    let wrong = if count == 0 || rng.random_bool(0.5) { count + 1 } else { count - 1 };
    problem(
        Skill::LetterCount,
        format!("How many times does the letter \"{letter}\" appear in the word \"{word}\"?"),
        "<number>",
        count.to_string(),
        wrong.to_string(),
        format!("{word}:{letter}"),
    )
}

/// The weekday some days after or before a given one; the wrong answer is a neighbouring day.
pub fn weekday(rng: &mut ChaCha8Rng) -> Problem {
    let start = rng.random_range(0..7usize);
    let days = rng.random_range(2..=60usize);
    let after = rng.random_bool(0.5);
    let answer = if after { (start + days) % 7 } else { (start + 7 - days % 7) % 7 };
    let wrong = if rng.random_bool(0.5) { (answer + 1) % 7 } else { (answer + 6) % 7 };
    let question = if after {
        format!("Today is {}. What day of the week will it be in {days} days?", WEEKDAYS[start])
    } else {
        format!("Today is {}. What day of the week was it {days} days ago?", WEEKDAYS[start])
    };
    problem(
        Skill::Weekday,
        question,
        "<day of the week>",
        WEEKDAYS[answer].to_string(),
        WEEKDAYS[wrong].to_string(),
        format!("{start}:{days}:{after}"),
    )
}

/// Days in `month` (1-based) of `year`, Gregorian.
pub fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// `(year, month, day)` moved by one day forward.
fn next_day((y, m, d): (i32, u32, u32)) -> (i32, u32, u32) {
    if d < days_in_month(y, m) {
        (y, m, d + 1)
    } else if m < 12 {
        (y, m + 1, 1)
    } else {
        (y + 1, 1, 1)
    }
}

/// `YYYY-MM-DD`.
pub fn iso_date((y, m, d): (i32, u32, u32)) -> String {
    format!("{y:04}-{m:02}-{d:02}")
}

/// The date some days after a given one; the wrong answer is one day off.
pub fn date_shift(rng: &mut ChaCha8Rng) -> Problem {
    let year = rng.random_range(1990..=2030i32);
    let month = rng.random_range(1..=12u32);
    let day = rng.random_range(1..=days_in_month(year, month));
    let days = rng.random_range(3..=120u32);
    let mut date = (year, month, day);
    let mut dates = Vec::with_capacity(days as usize + 2);
    for _ in 0..=days {
        dates.push(date);
        date = next_day(date);
    }
    dates.push(date);
    let answer = dates[days as usize];
    let wrong = if rng.random_bool(0.5) { dates[days as usize + 1] } else { dates[days as usize - 1] };
    problem(
        Skill::DateShift,
        format!("What is the date {days} days after {} {day}, {year}?", MONTHS[month as usize - 1]),
        "YYYY-MM-DD",
        iso_date(answer),
        iso_date(wrong),
        format!("{year}:{month}:{day}:{days}"),
    )
}

/// `(larger unit, smaller unit, smaller units per larger unit)`.
pub const UNITS: [(&str, &str, u32); 8] = [
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("centimetres", "millimetres", 10),
    ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
];

/// A value in tenths, written without a trailing `.0` (`35` -> `3.5`, `40` -> `4`).
pub fn tenths(value: u64) -> String {
    if value.is_multiple_of(10) { (value / 10).to_string() } else { format!("{}.{}", value / 10, value % 10) }
}

/// Unit conversion up (`3.5 kilometres to metres`) or down (`4200 metres to kilometres`); the
/// wrong answer is off by a factor of 10, the usual slip.
pub fn unit_conversion(rng: &mut ChaCha8Rng) -> Problem {
    let (large, small, factor) = *UNITS.choose(rng).unwrap_or(&UNITS[0]);
    let t = rng.random_range(1..=300u64); // the larger-unit amount, in tenths
    let factor = u64::from(factor);
    let to_small = rng.random_bool(0.5);
    // Up: t/10 large = t * factor / 10 small. Every factor is a multiple of 2 and 5 or of 6,
    // so choose t to keep the small amount whole.
    let t = if (t * factor).is_multiple_of(10) { t } else { t * 10 };
    let small_amount = t * factor / 10;
    let (question, answer, wrong, key) = if to_small {
        let wrong = if rng.random_bool(0.5) || !small_amount.is_multiple_of(10) {
            small_amount * 10
        } else {
            small_amount / 10
        };
        (format!("Convert {} {large} to {small}.", tenths(t)), small_amount.to_string(), wrong.to_string(), t)
    } else {
        let wrong = if rng.random_bool(0.5) || !t.is_multiple_of(10) { t * 10 } else { t / 10 };
        (format!("Convert {small_amount} {small} to {large}."), tenths(t), tenths(wrong), t)
    };
    problem(Skill::UnitConversion, question, "<number>", answer, wrong, format!("{large}:{small}:{to_small}:{key}"))
}
