//! Added-token splitting as `tokenizers`' `AddedVocabulary` does it without a normalizer:
//! first the non-normalized tokens over the whole text, then the normalized ones over what is
//! left; each pass takes leftmost-longest matches, widened over whitespace by `lstrip` /
//! `rstrip`.

/// One added token.
#[derive(Debug, Clone)]
pub(crate) struct AddedToken {
    pub content: String,
    pub id: u32,
    pub lstrip: bool,
    pub rstrip: bool,
}

/// Leftmost-longest matcher over a set of added tokens.
#[derive(Debug, Default)]
pub(crate) struct Matcher {
    /// Tokens by first byte, longest first.
    by_first: Vec<Vec<AddedToken>>,
}

/// A part of the text: plain text or an added token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part<'a> {
    Text(&'a str),
    Token(u32),
}

impl Matcher {
    pub fn new(tokens: Vec<AddedToken>) -> Self {
        let mut by_first: Vec<Vec<AddedToken>> = vec![Vec::new(); 256];
        for t in tokens {
            if let Some(&b) = t.content.as_bytes().first() {
                by_first[b as usize].push(t);
            }
        }
        for list in &mut by_first {
            list.sort_by_key(|t| std::cmp::Reverse(t.content.len()));
        }
        if by_first.iter().all(Vec::is_empty) {
            by_first.clear();
        }
        Self { by_first }
    }

    /// The longest token at byte `i` of `s`.
    fn at(&self, s: &str, i: usize) -> Option<&AddedToken> {
        let rest = &s.as_bytes()[i..];
        self.by_first.get(*rest.first()? as usize)?.iter().find(|t| rest.starts_with(t.content.as_bytes()))
    }

    /// Splits `s` into parts (empty text parts dropped), calling `part` for each.
    pub fn split<'a>(&self, s: &'a str, part: &mut impl FnMut(Part<'a>)) {
        if self.by_first.is_empty() {
            if !s.is_empty() {
                part(Part::Text(s));
            }
            return;
        }
        let bytes = s.as_bytes();
        let (mut done, mut i) = (0, 0);
        while i < bytes.len() {
            if self.by_first[bytes[i] as usize].is_empty() {
                i += 1;
                continue;
            }
            let Some(t) = self.at(s, i) else {
                i += 1;
                continue;
            };
            let mut start = i;
            let mut stop = i + t.content.len();
            if t.lstrip {
                let trimmed = s[..start].trim_end_matches(char::is_whitespace).len();
                start = trimmed.max(done);
            }
            if t.rstrip {
                stop = s.len() - s[stop..].trim_start_matches(char::is_whitespace).len();
            }
            if done < start {
                part(Part::Text(&s[done..start]));
            }
            part(Part::Token(t.id));
            done = stop;
            i = stop;
        }
        if done < s.len() {
            part(Part::Text(&s[done..]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(content: &str, id: u32, lstrip: bool, rstrip: bool) -> AddedToken {
        AddedToken { content: content.into(), id, lstrip, rstrip }
    }

    #[test]
    fn takes_leftmost_longest_matches_and_strips() {
        let m =
            Matcher::new(vec![tok("<a>", 1, false, false), tok("<a><b>", 2, false, false), tok("<c>", 3, true, true)]);
        let mut parts = Vec::new();
        m.split("x<a><b>y<a> <c> z", &mut |p| parts.push(p));
        use Part::*;
        assert_eq!(parts, [Text("x"), Token(2), Text("y"), Token(1), Token(3), Text("z")]);
    }
}
