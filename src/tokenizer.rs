//! The CLIP tokenizer, as diffusers 0.42.1 calls it through transformers 5.24.
//!
//! diffusers' Würstchen pipelines load `CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer")`
//! (in transformers 5 the `tokenizers`-backed class) and call it twice per prompt (`encode_prompt`):
//!
//! ```text
//! tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
//! untruncated_ids = tokenizer(prompt, padding="longest").input_ids
//! # if untruncated_ids is longer: warn with batch_decode(untruncated_ids[:, model_max_length - 1 : -1])
//! ```
//!
//! `CLIPTokenizer.__init__` always builds the pipeline itself (NFC, `\s+` -> " ", lowercase; CLIP's
//! split regex + byte-level; BPE with `</w>` word ends; RobertaProcessing with BOS/EOS) and takes
//! only the vocabulary, the merges and the added tokens from `tokenizer.json` (or the two tables
//! from `vocab.json` + `merges.txt`). [`ClipTokenizer::load`] does the same with `tokenizers`'
//! builders, so both layouts, and a `tokenizer.json` with another pipeline, tokenize as there.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{replace::ReplacePattern, Lowercase, Replace, Sequence, NFC};
use tokenizers::pre_tokenizers::{sequence::Sequence as PreSequence, split::Split, split::SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::ModelError;
use crate::hub::{read_parsed, FileSource};
use special_tokens::{model_max_length, resolve_settings, Settings, TokenDict, TokenizerConfig};

/// The BPE model's word-end marker (`CLIPTokenizer.__init__`: `end_of_word_suffix="</w>"`).
const END_OF_WORD_SUFFIX: &str = "</w>";

/// CLIP's pre-tokenizer split pattern, verbatim from transformers' `tokenization_clip.py`.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// What is wrong with a file's content; the caller names the file.
type Parsed<T> = std::result::Result<T, String>;

/// One prompt, tokenized as diffusers' first tokenizer call returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// BOS, at most `max_len - 2` BPE tokens, EOS, then the pad token: exactly `max_len` ids.
    pub ids: Vec<u32>,
    /// 1 for BOS, the content and EOS, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// The text cut off a prompt that did not fit, as diffusers' warning shows it.
    pub dropped: Option<String>,
}

/// A CLIP tokenizer with `CLIPTokenizer` semantics (see the module docs).
pub struct ClipTokenizer {
    /// The pipeline `CLIPTokenizer.__init__` builds; no truncation, no padding.
    tokenizer: Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Load the tokenizer in folder `component` (`"tokenizer"` in diffusers' layout) of `src`:
    /// `tokenizer.json` if present, else `vocab.json` + `merges.txt`; `tokenizer_config.json`
    /// and `special_tokens_map.json` (both optional) name the special tokens and the length.
    pub fn load(src: &dyn FileSource, component: &str) -> Result<Self> {
        let started = std::time::Instant::now();
        let folder = Folder { src, component };
        let parse_config = |text: &str| serde_json::from_str(text).map_err(|e| e.to_string());
        let config: Option<(PathBuf, TokenizerConfig)> = folder.parse("tokenizer_config.json", parse_config)?;
        let special_map = folder.parse("special_tokens_map.json", parse_config)?;
        let ((vocab, merges, file_added), source) = match folder.parse("tokenizer.json", parse_tokenizer_json)? {
            Some((path, tables)) => (tables, path),
            None => match (
                folder.parse("vocab.json", parse_vocab_json)?,
                folder.parse("merges.txt", parse_merges_txt)?,
            ) {
                (Some((path, vocab)), Some((_, merges))) => ((vocab, merges, Vec::new()), path),
                (None, None) => {
                    return Err(folder.missing(&format!(
                        "tokenizer.json (nor {component}/vocab.json + {component}/merges.txt)"
                    )))
                }
                (_, None) => return Err(folder.missing("merges.txt")),
                (None, _) => return Err(folder.missing("vocab.json")),
            },
        };

        // Errors here are in the file that names the special tokens and the length. A named token
        // outside the vocabulary is one: transformers would append it as a new token, one the text
        // encoder does not have.
        let (config, special_map) = (config.as_ref(), special_map.as_ref());
        let names = config.or(special_map).map_or(&source, |(path, _)| path);
        let max_len = model_max_length(config.and_then(|c| c.1.model_max_length)).map_err(|m| folder.bad(names, m))?;
        let settings = resolve_settings(config.map(|c| &c.1), special_map.map(|s| &s.1), file_added, &vocab);
        let settings = settings.map_err(|m| folder.bad(names, format!("{m} of {}", source.display())))?;
        let pad_id = settings.pad_id;
        let tokenizer = clip_tokenizer(vocab, merges, settings).map_err(|m| folder.bad(&source, m))?;
        let (file, ms) = (source.display(), started.elapsed().as_secs_f64() * 1e3);
        tracing::debug!(source = %src.describe(), %file, max_len, pad_id, "loaded the {component} CLIP tokenizer in {ms:.1} ms");
        Ok(Self {
            tokenizer,
            max_len,
            pad_id,
        })
    }

    /// `model_max_length`: the number of ids [`ClipTokenizer::encode`] returns.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenize one prompt the way diffusers' `encode_prompt` does (see the module docs).
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        // The second call, `padding="longest"` on one prompt: BOS, every BPE token, EOS.
        let full = self.tokenizer.encode(text, true);
        let full = full.map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        let (full, max_len) = (full.get_ids(), self.max_len);
        // The first call, `padding="max_length", truncation=True`: `tokenizers` truncates the BPE
        // tokens to `max_len - 2` (room for BOS and EOS), then pads with mask 0. diffusers warns
        // when `untruncated_ids` is at least as long and differs: for one prompt, when longer.
        let (mut ids, dropped) = if full.len() > max_len {
            let kept = [&full[..max_len - 1], &full[full.len() - 1..]].concat();
            (kept, Some(self.decode_text(&full[max_len - 1..full.len() - 1])?))
        } else {
            (full.to_vec(), None)
        };
        let mut attention_mask = vec![1; ids.len()];
        ids.resize(max_len, self.pad_id);
        attention_mask.resize(max_len, 0);
        Ok(Tokens {
            ids,
            attention_mask,
            dropped,
        })
    }

    /// `CLIPTokenizer.decode(ids)`: byte-level decode (special tokens kept), every `</w>` turned
    /// into a space, then Python's `str.strip()`.
    fn decode_text(&self, ids: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(ids, false);
        let text = text.map_err(|e| anyhow!("cannot decode {ids:?}: {e}"))?;
        Ok(py_strip(&text.replace(END_OF_WORD_SUFFIX, " ")).to_string())
    }
}

/// The `tokenizer.json` that transformers 5's `CLIPTokenizer` saves for the slow tokenizer's
/// files `vocab.json` (token -> id) and `merges.txt` (a `#version` line, then `a b` per line),
/// with the default special tokens: the same JSON as the Hub's CLIP `tokenizer.json` files.
pub fn clip_tokenizer_json(vocab_json: &str, merges_txt: &str) -> Result<String> {
    let vocab = parse_vocab_json(vocab_json).map_err(|m| anyhow!("vocab.json: {m}"))?;
    let merges = parse_merges_txt(merges_txt).map_err(|m| anyhow!("merges.txt: {m}"))?;
    let settings = resolve_settings(None, None, Vec::new(), &vocab).map_err(|m| anyhow!("vocab.json: {m}"))?;
    let tokenizer = clip_tokenizer(vocab, merges, settings).map_err(|m| anyhow!(m))?;
    tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("cannot write tokenizer.json: {e}"))
}

/// `CLIPTokenizer.__init__`'s pipeline around the two tables, with the resolved special tokens.
fn clip_tokenizer(vocab: Vocab, merges: Merges, settings: Settings) -> Parsed<Tokenizer> {
    // Each token once (the first with its content), and only vocabulary entries.
    let mut seen = HashSet::new();
    let added: Vec<_> = settings
        .added
        .into_iter()
        .filter(|t| seen.insert(t.content.clone()))
        .collect();
    if let Some(token) = added.iter().find(|t| !vocab.contains_key(&t.content)) {
        return Err(format!("added token {:?} is not in the vocabulary", token.content));
    }
    let failed = |e: tokenizers::Error| format!("cannot build the CLIP tokenizer: {e}");
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(settings.unk)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD_SUFFIX.to_string())
        .build()
        .map_err(failed)?;
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(failed)?;
    let normalizer = Sequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()]);
    let split = SplitPattern::Regex(CLIP_SPLIT_REGEX.into());
    let split = Split::new(split, SplitDelimiterBehavior::Removed, true).map_err(failed)?;
    let pre_tokenizer = PreSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    let post_processor = RobertaProcessing::new(settings.eos, settings.bos)
        .trim_offsets(false)
        .add_prefix_space(false);

    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(failed)?
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_post_processor(Some(post_processor))
        .with_decoder(Some(ByteLevel::default()));
    // After the normalizer, so that a `normalized` token matches the normalized text.
    tokenizer.add_tokens(added).map_err(failed)?;
    Ok(tokenizer)
}

/// The tokenizer's folder of a model; its errors name the component and the file.
struct Folder<'a> {
    src: &'a dyn FileSource,
    component: &'a str,
}

impl Folder<'_> {
    fn missing(&self, name: &str) -> anyhow::Error {
        self.src
            .missing(self.component, &format!("{}/{name}", self.component))
            .into()
    }

    fn bad(&self, path: &Path, message: String) -> ModelError {
        ModelError::bad_file(self.component, path, message)
    }

    /// File `name` parsed with `parse`, and its path; `None` if the folder has no such file.
    fn parse<T>(&self, name: &str, parse: impl FnOnce(&str) -> Parsed<T>) -> Result<Option<(PathBuf, T)>> {
        read_parsed(self.src, self.component, &format!("{}/{name}", self.component), parse)
    }
}

/// `vocab.json`: a JSON object token -> id.
fn parse_vocab_json(text: &str) -> Parsed<Vocab> {
    serde_json::from_str(text).map_err(|e| format!("expected {{token: id}}: {e}"))
}

/// `merges.txt` as `tokenizers`' `BPE::read_file` reads it (what transformers 5 hands the file
/// to): every line starting with `#version` skipped, every other line exactly `a b`.
fn parse_merges_txt(text: &str) -> Parsed<Merges> {
    let lines = text.lines().filter(|l| !l.starts_with("#version"));
    lines.enumerate().map(|(rank, line)| split_merge(line, rank)).collect()
}

fn split_merge(merge: &str, rank: usize) -> Parsed<(String, String)> {
    match merge.split_once(' ') {
        Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
        _ => Err(format!(
            "merge {} is {merge:?}, expected two tokens separated by one space",
            rank + 1
        )),
    }
}

/// What transformers 5's `convert_to_native_format` keeps of a `tokenizer.json` for a class with
/// its own `__init__`: vocab, merges and added tokens. The two tables stay raw JSON here, to be
/// parsed side by side (most of a load is building them).
#[derive(Deserialize)]
struct TokenizerJson<'a> {
    #[serde(borrow)]
    model: BpeJson<'a>,
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
}

#[derive(Deserialize)]
struct BpeJson<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(borrow)]
    vocab: &'a RawValue,
    #[serde(borrow)]
    merges: &'a RawValue,
}

#[derive(Deserialize)]
struct AddedTokenJson {
    id: u32,
    #[serde(flatten)]
    token: TokenDict,
}

/// Vocab, merges, and the added tokens with their ids.
type Tables = (Vocab, Merges, Vec<(u32, AddedToken)>);

fn parse_tokenizer_json(text: &str) -> Parsed<Tables> {
    let file: TokenizerJson = serde_json::from_str(text).map_err(|e| format!("not a BPE tokenizer.json: {e}"))?;
    if let Some(kind) = file.model.kind.filter(|k| k != "BPE") {
        return Err(format!("model type is {kind:?}, CLIP needs \"BPE\""));
    }
    let (vocab, merges) = std::thread::scope(|s| {
        let vocab = s.spawn(|| serde_json::from_str::<Vocab>(file.model.vocab.get()));
        let merges = parse_json_merges(file.model.merges.get());
        (vocab.join(), merges)
    });
    let vocab = vocab.map_err(|_| "model.vocab: the parser panicked")?;
    let vocab = vocab.map_err(|e| format!("model.vocab: expected {{token: id}}: {e}"))?;
    // A missing `normalized` is `tokenizers`' default, true.
    let added = file.added_tokens.iter().map(|t| {
        let normalized = t.token.normalized.unwrap_or(true);
        (t.id, t.token.token(false).normalized(normalized))
    });
    Ok((vocab, merges?, added.collect()))
}

/// `model.merges`: `["a", "b"]` pairs, or the `"a b"` strings of `tokenizers` < 0.20.
fn parse_json_merges(json: &str) -> Parsed<Merges> {
    serde_json::from_str::<Merges>(json).or_else(|e| {
        let old: Vec<String> = serde_json::from_str(json).map_err(|_| format!("model.merges: {e}"))?;
        old.iter().enumerate().map(|(rank, m)| split_merge(m, rank)).collect()
    })
}

/// Python's `str.strip()`: trims what `str.isspace()` accepts, which is Rust's White_Space plus
/// the four information separators U+001C..U+001F.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

mod special_tokens;
#[cfg(test)]
mod tests;
