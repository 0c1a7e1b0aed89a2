//! The GPT-2 pre-tokenizer regex of `tokenizers`' `ByteLevel`, written out over chars:
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, and the
//! `Digits` pre-tokenizer that may run before it.
//!
//! The regex is leftmost-first: at each position the first alternative that matches wins,
//! each greedy. `\p{L}` / `\p{N}` are Unicode general categories (Unicode 16, the version of
//! the Oniguruma that `tokenizers` uses); `\s` is `White_Space` (= [`char::is_whitespace`]).

use unicode_general_category::{GeneralCategory as G, get_general_category};

/// The regex's character classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// `\p{L}`.
    Letter,
    /// `\p{N}`.
    Number,
    /// `\s`.
    Space,
    /// `[^\s\p{L}\p{N}]`.
    Other,
}

/// Classes of the ASCII characters, computed once.
const ASCII: [Class; 128] = {
    let mut t = [Class::Other; 128];
    let mut i = 0;
    while i < 128 {
        let b = i as u8;
        t[i] = if b.is_ascii_alphabetic() {
            Class::Letter
        } else if b.is_ascii_digit() {
            Class::Number
        } else if matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
            Class::Space
        } else {
            Class::Other
        };
        i += 1;
    }
    t
};

fn class(c: char) -> Class {
    if c.is_ascii() {
        return ASCII[c as usize];
    }
    if c.is_whitespace() {
        return Class::Space;
    }
    match get_general_category(c) {
        G::UppercaseLetter | G::LowercaseLetter | G::TitlecaseLetter | G::ModifierLetter | G::OtherLetter => {
            Class::Letter
        }
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => Class::Number,
        _ => Class::Other,
    }
}

/// The char at byte `i` of `s` (a char boundary) and its length in bytes.
#[inline]
fn char_at(s: &str, i: usize) -> Option<(char, usize)> {
    let b = *s.as_bytes().get(i)?;
    if b < 0x80 {
        return Some((b as char, 1));
    }
    s[i..].chars().next().map(|c| (c, c.len_utf8()))
}

/// End of the run of chars of class `cls` starting at byte `i`.
#[inline]
fn run_end(s: &str, mut i: usize, cls: Class) -> usize {
    while let Some((c, n)) = char_at(s, i) {
        if class(c) != cls {
            break;
        }
        i += n;
    }
    i
}

/// Length of a contraction (`'s 't 're 've 'm 'll 'd`, lowercase only) at the start of `rest`.
fn contraction(rest: &[u8]) -> Option<usize> {
    match rest {
        [b'\'', b's' | b't' | b'm' | b'd', ..] => Some(2),
        [b'\'', b'r', b'e', ..] | [b'\'', b'v', b'e', ..] | [b'\'', b'l', b'l', ..] => Some(3),
        _ => None,
    }
}

/// Calls `word` with each match of the GPT-2 regex in `s`, in order (they cover `s`).
pub(crate) fn gpt2_words(s: &str, mut word: impl FnMut(&str)) {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some((c, n)) = char_at(s, i) {
        let end = if let Some(len) = contraction(&bytes[i..]) {
            i + len
        } else {
            match class(c) {
                cls @ (Class::Letter | Class::Number | Class::Other) => run_end(s, i + n, cls),
                Class::Space => match char_at(s, i + n) {
                    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: a space glued to the next run.
                    Some((next, m)) if c == ' ' && class(next) != Class::Space => run_end(s, i + n + m, class(next)),
                    _ => {
                        let run = run_end(s, i, Class::Space);
                        if run == s.len() {
                            run
                        } else {
                            // `\s+(?!\S)` backs off one char so the last space stays with what follows;
                            // a single space before a non-space is `\s+` alone.
                            let last = s[i..run].char_indices().next_back().map_or(i, |(k, _)| i + k);
                            if last > i { last } else { run }
                        }
                    }
                },
            }
        };
        word(&s[i..end]);
        i = end;
    }
}

/// Calls `piece` with the parts of `s` split as `Digits` does: each numeric char alone
/// (`individual`), else runs of numeric chars, as separate parts ([`char::is_numeric`], as there).
pub(crate) fn digit_split(s: &str, individual: bool, mut piece: impl FnMut(&str)) {
    let mut start = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !c.is_numeric() {
            continue;
        }
        if start < i {
            piece(&s[start..i]);
        }
        let mut end = i + c.len_utf8();
        if !individual {
            while let Some(&(j, d)) = chars.peek() {
                if !d.is_numeric() {
                    break;
                }
                end = j + d.len_utf8();
                chars.next();
            }
        }
        piece(&s[i..end]);
        start = end;
    }
    if start < s.len() {
        piece(&s[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        let mut v = Vec::new();
        gpt2_words(s, |w| v.push(w.to_string()));
        v
    }

    #[test]
    fn splits_like_the_gpt2_regex() {
        assert_eq!(words("Hello world's  end"), ["Hello", " world", "'s", " ", " end"]);
        assert_eq!(words("a  \nb"), ["a", "  ", "\n", "b"]);
        assert_eq!(words("x 42!? \t"), ["x", " 42", "!?", " \t"]);
        assert_eq!(words("'S ''s 'll"), ["'", "S", " ''", "s", " '", "ll"]);
        assert_eq!(words("\n\nHi"), ["\n", "\n", "Hi"]);
    }

    #[test]
    fn digits_are_split_alone_or_in_runs() {
        let mut v = Vec::new();
        digit_split("ab12c3", true, |p| v.push(p.to_string()));
        assert_eq!(v, ["ab", "1", "2", "c", "3"]);
        v.clear();
        digit_split("ab12c3", false, |p| v.push(p.to_string()));
        assert_eq!(v, ["ab", "12", "c", "3"]);
    }
}
