//! Prompts files for batches: one prompt per line, or JSON Lines with per-line overrides.
//! Parsing never fails as a whole: each line is an entry or an error naming `file:line`, so
//! `--keep-going` can skip bad lines and everything else can stop before any work.

use serde::Deserialize;

use crate::error::InputError;

/// The fields a JSON line may set; anything else is an error (a typo must not be ignored).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptLine {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// prior steps (`steps` also accepted)
    #[serde(alias = "steps")]
    pub prior_steps: Option<usize>,
    pub prior_timesteps: Option<Vec<f64>>,
    /// prior guidance (`guidance` also accepted)
    #[serde(alias = "guidance")]
    pub prior_guidance: Option<f64>,
    pub decoder_steps: Option<usize>,
    pub decoder_guidance: Option<f64>,
    pub num_images: Option<usize>,
    /// output path or template for this line's images
    pub output: Option<String>,
}

/// One prompt of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// 1-based line number in the file
    pub line: usize,
    /// 0-based position among the file's prompts (blank lines do not count): `{index}` in
    /// output names, the default seed offset and what `--shard` splits on
    pub index: usize,
    pub fields: PromptLine,
}

/// Parses a prompts file's bytes. Lines starting with `{` are JSON objects; other non-blank
/// lines are prompts as they are (surrounding whitespace trimmed); blank lines are skipped.
pub fn parse(name: &str, bytes: &[u8]) -> Vec<Result<Entry, InputError>> {
    let mut out = Vec::new();
    let mut index = 0;
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t.trim(),
            Err(e) => {
                out.push(Err(InputError::new(format!(
                    "{name}:{line}: not valid UTF-8 (byte {})",
                    e.valid_up_to() + 1
                ))));
                index += 1;
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        let fields = if text.starts_with('{') {
            serde_json::from_str::<PromptLine>(text)
                .map_err(|e| InputError::new(format!("{name}:{line}: invalid JSON line: {e}")))
        } else {
            Ok(PromptLine {
                prompt: text.to_string(),
                ..Default::default()
            })
        };
        out.push(fields.map(|fields| Entry { line, index, fields }));
        index += 1;
    }
    out
}

/// `--shard I/N`: 0-based I < N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        let bad = || InputError::new(format!("--shard {s:?}: expected I/N with 0 <= I < N, e.g. 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// Whether the prompt at `index` belongs to this shard (every N-th from I).
    pub fn takes(&self, index: usize) -> bool {
        index % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_json_lines() {
        let file = b"a cat\n\n  {\"prompt\": \"a dog\", \"seed\": 5, \"steps\": 3, \"guidance\": 2.5}\r\nlast line";
        let entries: Vec<Entry> = parse("p.txt", file).into_iter().map(Result::unwrap).collect();
        assert_eq!(entries.len(), 3);
        assert_eq!(
            (entries[0].line, entries[0].index, entries[0].fields.prompt.as_str()),
            (1, 0, "a cat")
        );
        assert_eq!((entries[1].line, entries[1].index), (3, 1));
        assert_eq!(entries[1].fields.seed, Some(5));
        assert_eq!(entries[1].fields.prior_steps, Some(3));
        assert_eq!(entries[1].fields.prior_guidance, Some(2.5));
        assert_eq!(entries[2].fields.prompt, "last line");
    }

    #[test]
    fn errors_name_file_and_line() {
        let file = b"ok\n{\"prompt\": \"x\", \"stpes\": 3}\n\xff\xfe bad\n{not json";
        let r = parse("p.jsonl", file);
        assert!(r[0].is_ok());
        let msgs: Vec<String> = r[1..].iter().map(|e| e.as_ref().unwrap_err().to_string()).collect();
        assert!(
            msgs[0].starts_with("p.jsonl:2:") && msgs[0].contains("stpes"),
            "{}",
            msgs[0]
        );
        assert!(
            msgs[1].starts_with("p.jsonl:3:") && msgs[1].contains("UTF-8"),
            "{}",
            msgs[1]
        );
        assert!(msgs[2].starts_with("p.jsonl:4:"), "{}", msgs[2]);
    }

    #[test]
    fn shards_split_every_nth() {
        let s = Shard::parse("1/3").unwrap();
        assert_eq!((0..9).filter(|i| s.takes(*i)).collect::<Vec<_>>(), vec![1, 4, 7]);
        for bad in ["3/3", "1", "a/b", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
