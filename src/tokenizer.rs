//! The CLIP tokenizer, as diffusers 0.42.1 calls it through transformers 5.24.
//!
//! diffusers' Würstchen pipelines load `CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer")`
//! (in transformers 5 that is the `tokenizers`-backed class, the old `CLIPTokenizerFast`) and call
//! it twice per prompt (`pipeline_wuerstchen_prior.py`, `encode_prompt`):
//!
//! ```text
//! tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
//! untruncated_ids = tokenizer(prompt, padding="longest").input_ids
//! # if untruncated_ids is longer: warn with batch_decode(untruncated_ids[:, model_max_length - 1 : -1])
//! ```
//!
//! How transformers 5 builds that tokenizer matters for which parts of the files count:
//! `CLIPTokenizer.__init__` always builds the pipeline itself (NFC, `\s+` -> " ", lowercase;
//! CLIP's split regex + byte-level; BPE with `</w>` word ends; RobertaProcessing with BOS/EOS)
//! and takes from `tokenizer.json` only the vocabulary, the merges and the added tokens, from
//! `vocab.json` + `merges.txt` the same two tables. [`ClipTokenizer::load`] does the same with
//! `tokenizers`' builders, so both layouts give the same tokens, and a `tokenizer.json` written
//! by an older `tokenizers` with another normalizer or pre-tokenizer still tokenizes the way
//! transformers 5 does.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
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
use crate::hub::FileSource;

/// The BPE model's word-end marker (`CLIPTokenizer.__init__`: `end_of_word_suffix="</w>"`).
const END_OF_WORD_SUFFIX: &str = "</w>";

/// CLIP's pre-tokenizer split pattern, verbatim from transformers' `tokenization_clip.py`.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `CLIPTokenizer.__init__`'s BOS, EOS, UNK and PAD, for a token no file names.
const DEFAULT_NAMES: [&str; 4] = ["<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"];

/// CLIP's context length: the text encoders' `max_position_embeddings` in every Würstchen repo.
/// Used when `tokenizer_config.json` has no `model_max_length` or transformers' "unset" value.
const DEFAULT_MAX_LEN: usize = 77;

/// Above this, `model_max_length` is transformers' "no limit" marker (it writes `int(1e30)`),
/// not a length; nothing CLIP-like comes near it.
const MAX_SANE_MAX_LEN: f64 = 65_536.0;

/// What is wrong with a file's content; the caller names the file.
type Parsed<T> = std::result::Result<T, String>;

/// One prompt, tokenized as diffusers' first tokenizer call returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// BOS, at most `max_len - 2` BPE tokens, EOS, then the pad token: exactly `max_len` ids.
    pub ids: Vec<u32>,
    /// 1 for BOS, the content and EOS, 0 for padding: exactly `max_len` entries.
    pub attention_mask: Vec<u32>,
    /// When the prompt did not fit: the text that was cut off, as diffusers' warning shows it
    /// (`batch_decode(untruncated_ids[max_len - 1 : -1])`). `None` when nothing was cut.
    pub dropped: Option<String>,
}

/// A CLIP tokenizer with `CLIPTokenizer` semantics (see the module docs).
pub struct ClipTokenizer {
    /// The pipeline `CLIPTokenizer.__init__` builds; no truncation, no padding.
    tokenizer: Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
                    let alternative = format!("(nor {component}/vocab.json + {component}/merges.txt)");
                    return Err(folder.missing(&format!("tokenizer.json {alternative}")));
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
        let file = source.display();
        let ms = started.elapsed().as_secs_f64() * 1e3;
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
    let json = tokenizer.to_string(false);
    json.map_err(|e| anyhow!("cannot write tokenizer.json: {e}"))
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
    let split = SplitPattern::Regex(CLIP_SPLIT_REGEX.into());
    let split = Split::new(split, SplitDelimiterBehavior::Removed, true).map_err(failed)?;

    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(Sequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(failed)?
        .with_pre_tokenizer(Some(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])))
        .with_post_processor(Some(
            RobertaProcessing::new(settings.eos, settings.bos)
                .trim_offsets(false)
                .add_prefix_space(false),
        ))
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
        let Some((path, text)) = self
            .src
            .read_text(self.component, &format!("{}/{name}", self.component))?
        else {
            return Ok(None);
        };
        let value = parse(&text).map_err(|m| self.bad(&path, m))?;
        Ok(Some((path, value)))
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
    let vocab = match vocab {
        Ok(parsed) => parsed.map_err(|e| format!("model.vocab: expected {{token: id}}: {e}"))?,
        Err(_) => return Err("model.vocab: the parser panicked".into()),
    };
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

// ------------------------------------------------------------------------------------------
// Special tokens and length, resolved as transformers 5's `from_pretrained` resolves them
// ------------------------------------------------------------------------------------------

/// `tokenizer_config.json`, and of it `special_tokens_map.json` has the named tokens.
#[derive(Deserialize)]
struct TokenizerConfig {
    /// id -> token; a `BTreeMap`, so in id order.
    added_tokens_decoder: Option<BTreeMap<u32, TokenDict>>,
    bos_token: Option<NamedToken>,
    eos_token: Option<NamedToken>,
    unk_token: Option<NamedToken>,
    pad_token: Option<NamedToken>,
    model_max_length: Option<f64>,
}

/// A named special token: a string (`AddedToken(content, special=True)`) or an `AddedToken` dict.
#[derive(Deserialize)]
#[serde(untagged)]
enum NamedToken {
    Content(String),
    Dict(TokenDict),
}

impl TokenizerConfig {
    /// BOS, EOS, UNK and PAD, where the file names them.
    fn named(&self) -> [Option<&NamedToken>; 4] {
        [&self.bos_token, &self.eos_token, &self.unk_token, &self.pad_token].map(Option::as_ref)
    }
}

impl NamedToken {
    fn token(&self, force_special: bool) -> AddedToken {
        match self {
            NamedToken::Content(content) => AddedToken::from(content.as_str(), true),
            NamedToken::Dict(dict) => dict.token(force_special),
        }
    }
}

/// An `AddedToken` as a config file writes it.
#[derive(Deserialize)]
struct TokenDict {
    content: String,
    single_word: Option<bool>,
    lstrip: Option<bool>,
    rstrip: Option<bool>,
    normalized: Option<bool>,
    special: Option<bool>,
}

impl TokenDict {
    /// `AddedToken(**dict)`, plus `special=True` where transformers adds it: every flag false
    /// unless the dict says otherwise, `normalized` then defaulting to `not special`.
    fn token(&self, force_special: bool) -> AddedToken {
        let special = force_special || self.special.unwrap_or(false);
        AddedToken::from(self.content.as_str(), special)
            .single_word(self.single_word.unwrap_or(false))
            .lstrip(self.lstrip.unwrap_or(false))
            .rstrip(self.rstrip.unwrap_or(false))
            .normalized(self.normalized.unwrap_or(!special))
    }
}

/// The special tokens: BOS and EOS as the post-processor takes them (token, id).
struct Settings {
    bos: (String, u32),
    eos: (String, u32),
    unk: String,
    pad_id: u32,
    /// In the order transformers adds them: the added tokens' table by id, then the named
    /// special tokens it lacks.
    added: Vec<AddedToken>,
}

/// transformers 5 (`PreTrainedTokenizerBase._from_pretrained`, `TokenizersBackend.__init__`):
/// with an `added_tokens_decoder` in `tokenizer_config.json`, that table is the added tokens and
/// `special_tokens_map.json` is ignored; without one, `special_tokens_map.json` overrides the
/// config's named tokens and `tokenizer.json`'s `added_tokens` are the table. Named special
/// tokens missing from the table are added after it, as special tokens.
fn resolve_settings(
    config: Option<&TokenizerConfig>,
    special_map: Option<&TokenizerConfig>,
    mut file_added: Vec<(u32, AddedToken)>,
    vocab: &Vocab,
) -> Parsed<Settings> {
    let (mut added, special_map): (Vec<_>, _) = match config.and_then(|c| c.added_tokens_decoder.as_ref()) {
        Some(decoder) => (decoder.values().map(|t| t.token(false)).collect(), None),
        None => {
            file_added.sort_by_key(|(id, _)| *id);
            (file_added.into_iter().map(|(_, token)| token).collect(), special_map)
        }
    };
    let from_map = special_map.map_or([None; 4], TokenizerConfig::named);
    let from_config = config.map_or([None; 4], TokenizerConfig::named);
    let [bos, eos, unk, pad] = std::array::from_fn(|i| {
        let token = match (from_map[i], from_config[i]) {
            // `special_tokens_map.json` wins; its dicts become `AddedToken(**value, special=True)`.
            (Some(token), _) => token.token(true),
            (None, Some(token)) => token.token(false),
            (None, None) => AddedToken::from(DEFAULT_NAMES[i], true),
        };
        // A named token that the table has is that entry; a new one is added as special.
        let content = token.content.clone();
        if !added.iter().any(|t| t.content == content) {
            added.push(token.special(true));
        }
        content
    });
    let id_of = |what: &str, token: &str| {
        let id = vocab.get(token).copied();
        id.ok_or_else(|| format!("{what} token {token:?} is not in the vocabulary"))
    };
    let (bos_id, eos_id, _, pad_id) = (
        id_of("bos", &bos)?,
        id_of("eos", &eos)?,
        id_of("unk", &unk)?,
        id_of("pad", &pad)?,
    );
    Ok(Settings {
        bos: (bos, bos_id),
        eos: (eos, eos_id),
        unk,
        pad_id,
        added,
    })
}

/// `model_max_length` from `tokenizer_config.json`: absent, null or transformers' "unset"
/// value `int(1e30)` -> CLIP's 77 (diffusers would otherwise pad to 1e30).
fn model_max_length(value: Option<f64>) -> Parsed<usize> {
    match value {
        None => Ok(DEFAULT_MAX_LEN),
        Some(n) if n > MAX_SANE_MAX_LEN => {
            tracing::debug!(model_max_length = n, "model_max_length unset; using {DEFAULT_MAX_LEN}");
            Ok(DEFAULT_MAX_LEN)
        }
        Some(n) if n.fract() == 0.0 && n >= 2.0 => Ok(n as usize),
        Some(n) => Err(format!(
            "`model_max_length` is {n}, expected a whole number of at least 2 (BOS and EOS)"
        )),
    }
}

/// Python's `str.strip()`: trims what `str.isspace()` accepts, which is Rust's White_Space plus
/// the four information separators U+001C..U+001F.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use std::str::FromStr;

    use serde_json::{json, Value};
    use tokenizers::Tokenizer;

    use super::*;
    use crate::hub::LocalDir;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    #[derive(Deserialize)]
    struct Reference {
        prompts: Vec<String>,
        truncated_words: Vec<String>,
    }

    /// `prompts`, `truncated_words` and the `tokens.ids` / `tokens.mask` rows transformers
    /// computed for pipeline `tiny`.
    fn reference(tiny: &str) -> (Reference, Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let dir = fixtures().join(tiny);
        let meta: Reference =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let rows = |key: &str| -> Vec<Vec<u32>> {
            let t = st.tensor(key).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::I64, "{key}");
            assert_eq!(t.shape(), [meta.prompts.len(), 77], "{key}");
            let values: Vec<u32> = t
                .data()
                .chunks_exact(8)
                .map(|b| {
                    let v = i64::from_le_bytes(b.try_into().unwrap());
                    u32::try_from(v).unwrap()
                })
                .collect();
            values.chunks(77).map(<[u32]>::to_vec).collect()
        };
        let (ids, mask) = (rows("tokens.ids"), rows("tokens.mask"));
        (meta, ids, mask)
    }

    fn load(dir: impl Into<PathBuf>) -> Result<ClipTokenizer> {
        ClipTokenizer::load(&LocalDir::new(dir), "tokenizer")
    }

    fn model_error(err: &anyhow::Error) -> &ModelError {
        err.downcast_ref::<ModelError>()
            .unwrap_or_else(|| panic!("expected a ModelError, got: {err:#}"))
    }

    /// tiny-a's `tokenizer/` holds tokenizer.json, tiny-b's only vocab.json + merges.txt; both
    /// must give transformers' ids and masks, and diffusers' truncation warning text.
    #[test]
    fn matches_transformers_for_both_layouts() {
        for tiny in ["tiny-a", "tiny-b"] {
            let tok = load(fixtures().join(tiny).join("prior")).unwrap();
            assert_eq!(tok.max_len(), 77);
            let (meta, ids, mask) = reference(tiny);
            assert_eq!(meta.truncated_words.len(), 1);
            let long = meta.prompts.len() - 1; // make_fixtures.py: the last prompt is truncated
            for (i, prompt) in meta.prompts.iter().enumerate() {
                let got = tok.encode(prompt).unwrap();
                assert_eq!(got.ids, ids[i], "{tiny} ids of prompt {i} {prompt:?}");
                assert_eq!(got.attention_mask, mask[i], "{tiny} mask of prompt {i} {prompt:?}");
                if i == long {
                    // Exact: the fixture is diffusers' own `batch_decode(untruncated[:, 76:-1])`,
                    // and the decode is the same `tokenizers` ByteLevel decoder + transformers'
                    // "</w>" -> " " and strip(). ("word28" is the BPE tokens "2</w>" "8</w>", so
                    // the text reads "2 8 word 2 9 ...".)
                    assert_eq!(got.dropped.as_deref(), Some(meta.truncated_words[0].as_str()));
                    assert_eq!(got.ids[76], 49407, "EOS kept at the end");
                    assert!(got.attention_mask.iter().all(|&m| m == 1));
                } else {
                    assert_eq!(got.dropped, None, "{tiny} prompt {i} {prompt:?}");
                }
            }
        }
    }

    /// A prompt of exactly 75 content tokens fills all 77 slots without dropping anything
    /// (diffusers compares the untruncated ids, equal here); one more token is dropped.
    #[test]
    fn exact_fit_is_not_truncated() {
        let tok = load(fixtures().join("tiny-a/prior")).unwrap();
        let words = |n: usize| vec!["cat"; n].join(" ");
        let fit = tok.encode(&words(75)).unwrap();
        assert_eq!(fit.dropped, None);
        assert_eq!(fit.ids[0], 49406);
        assert_eq!(fit.ids[76], 49407);
        assert!(fit.ids[1..76].iter().all(|&id| id == fit.ids[1] && id != 49407));
        assert!(fit.attention_mask.iter().all(|&m| m == 1));
        let over = tok.encode(&format!("{} dogs", words(75))).unwrap();
        assert_eq!(over.ids, fit.ids);
        assert_eq!(over.dropped.as_deref(), Some("dogs"));
    }

    /// `clip_tokenizer_json` writes the same tokenizer.json that transformers saved for the
    /// fixture (same JSON value), and it tokenizes the same.
    #[test]
    fn clip_tokenizer_json_matches_fixture() {
        let bpe = fixtures().join("tokenizer-bpe");
        let ours = clip_tokenizer_json(
            &std::fs::read_to_string(bpe.join("vocab.json")).unwrap(),
            &std::fs::read_to_string(bpe.join("merges.txt")).unwrap(),
        )
        .unwrap();
        let theirs = std::fs::read_to_string(fixtures().join("tokenizer-json/tokenizer.json")).unwrap();
        let value = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert!(
            value(&ours) == value(&theirs),
            "tokenizer.json differs from the fixture"
        );

        let ours = Tokenizer::from_str(&ours).unwrap();
        let theirs = Tokenizer::from_str(&theirs).unwrap();
        let (meta, _, _) = reference("tiny-a");
        let extra = [
            "A  B\tC\nD",
            "<|endoftext|> x <|startoftext|>",
            "ÀÉÎ ǅ ﬁ 2³ ½",
            "\u{1c}x\u{a0}y",
        ];
        for text in meta.prompts.iter().map(String::as_str).chain(extra) {
            let a = ours.encode(text, true).unwrap();
            let b = theirs.encode(text, true).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
            assert!(a.get_ids().len() > 2 || text.is_empty(), "{text:?}");
        }
    }

    /// Config resolution as transformers 5 does it, checked against
    /// `CLIPTokenizer.from_pretrained(d)(text, padding="max_length", max_length=12,
    /// truncation=True)` on this folder (transformers 5.24): an `added_tokens_decoder` with
    /// `normalized: true` makes the special tokens match after lowercasing, `pad_token` "!" pads
    /// with id 0, and `model_max_length` 1e30 means "unset" (77 here).
    #[test]
    fn config_overrides_as_transformers() {
        let dir = tempfile::tempdir().unwrap();
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).unwrap();
        std::fs::copy(
            fixtures().join("tokenizer-json/tokenizer.json"),
            tok_dir.join("tokenizer.json"),
        )
        .unwrap();
        let special = |content: &str| {
            json!({"content": content, "lstrip": false, "normalized": true, "rstrip": false,
                   "single_word": false, "special": true})
        };
        let config = format!(
            r#"{{"added_tokens_decoder": {{"49406": {}, "49407": {}}},
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": "!",
                "model_max_length": 1000000000000000019884624838656}}"#,
            special("<|startoftext|>"),
            special("<|endoftext|>")
        );
        std::fs::write(tok_dir.join("tokenizer_config.json"), config).unwrap();
        // Ignored by transformers when the config has an added_tokens_decoder.
        std::fs::write(tok_dir.join("special_tokens_map.json"), r#"{"pad_token": "?"}"#).unwrap();

        let tok = load(dir.path()).unwrap();
        assert_eq!(tok.max_len(), 77);
        for (text, head) in [
            ("a <|ENDOFTEXT|> b", [49406, 320, 49407, 321, 49407]),
            ("x<|endoftext|>y", [49406, 343, 49407, 344, 49407]),
        ] {
            let got = tok.encode(text).unwrap();
            let mut ids = head.to_vec();
            ids.resize(77, 0);
            let mut mask = vec![1; 5];
            mask.resize(77, 0);
            assert_eq!(got.ids, ids, "{text:?}");
            assert_eq!(got.attention_mask, mask, "{text:?}");
        }

        // Without the added_tokens_decoder, special_tokens_map.json wins over the config and the
        // tokens come from tokenizer.json (normalized: false: "<|ENDOFTEXT|>" is plain text).
        std::fs::write(
            tok_dir.join("tokenizer_config.json"),
            r#"{"pad_token": "?", "model_max_length": 12}"#,
        )
        .unwrap();
        std::fs::write(
            tok_dir.join("special_tokens_map.json"),
            r#"{"pad_token": {"content": "!"}}"#,
        )
        .unwrap();
        let tok = load(dir.path()).unwrap();
        assert_eq!(tok.max_len(), 12);
        let got = tok.encode("a <|ENDOFTEXT|> b").unwrap();
        assert_eq!(got.ids, [49406, 320, 27, 347, 40786, 4160, 91, 285, 321, 49407, 0, 0]);
        assert_eq!(got.attention_mask, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
    }

    #[test]
    fn missing_tokenizer_is_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).unwrap_err();
        match model_error(&err) {
            ModelError::MissingFile { component, path } => {
                assert_eq!(component, "tokenizer");
                let path = path.display().to_string();
                assert!(path.contains("tokenizer/tokenizer.json"), "{path}");
                assert!(path.contains("tokenizer/merges.txt"), "{path}");
            }
            other => panic!("expected MissingFile, got {other}"),
        }

        // vocab.json without merges.txt names merges.txt.
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).unwrap();
        std::fs::write(tok_dir.join("vocab.json"), "{}").unwrap();
        let err = load(dir.path()).unwrap_err();
        match model_error(&err) {
            ModelError::MissingFile { component, path } => {
                assert_eq!(component, "tokenizer");
                assert!(path.ends_with("tokenizer/merges.txt"), "{}", path.display());
            }
            other => panic!("expected MissingFile, got {other}"),
        }
    }

    fn assert_bad_file(dir: &Path, file: &str) {
        let err = load(dir).unwrap_err();
        match model_error(&err) {
            ModelError::BadFile { component, path, .. } => {
                assert_eq!(component, "tokenizer");
                assert_eq!(path, &dir.join("tokenizer").join(file), "{err:#}");
            }
            other => panic!("expected BadFile for {file}, got {other}"),
        }
    }

    #[test]
    fn corrupt_files_are_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).unwrap();

        // tokenizer.json: cut in half; then valid JSON but not a tokenizer.
        let full = std::fs::read_to_string(fixtures().join("tokenizer-json/tokenizer.json")).unwrap();
        std::fs::write(tok_dir.join("tokenizer.json"), &full[..full.len() / 2]).unwrap();
        assert_bad_file(dir.path(), "tokenizer.json");
        std::fs::write(tok_dir.join("tokenizer.json"), r#"{"model": {"type": "BPE"}}"#).unwrap();
        assert_bad_file(dir.path(), "tokenizer.json");
        // A merge whose tokens are not in the vocabulary.
        std::fs::write(
            tok_dir.join("tokenizer.json"),
            r#"{"model": {"type": "BPE", "vocab": {"<|startoftext|>": 0, "<|endoftext|>": 1},
                "merges": [["a", "b"]]}}"#,
        )
        .unwrap();
        assert_bad_file(dir.path(), "tokenizer.json");
        std::fs::remove_file(tok_dir.join("tokenizer.json")).unwrap();

        // vocab.json + merges.txt: a bad merges line, then a bad vocab.
        let bpe = fixtures().join("tokenizer-bpe");
        std::fs::copy(bpe.join("vocab.json"), tok_dir.join("vocab.json")).unwrap();
        std::fs::write(tok_dir.join("merges.txt"), "#version: 0.2\ni n\nt h e\n").unwrap();
        assert_bad_file(dir.path(), "merges.txt");
        std::fs::copy(bpe.join("merges.txt"), tok_dir.join("merges.txt")).unwrap();
        std::fs::write(tok_dir.join("vocab.json"), r#"{"a": "zero"}"#).unwrap();
        assert_bad_file(dir.path(), "vocab.json");
        std::fs::copy(bpe.join("vocab.json"), tok_dir.join("vocab.json")).unwrap();
        assert!(load(dir.path()).is_ok());

        // tokenizer_config.json: not JSON; a pad token outside the vocabulary; a bad length.
        for config in ["{", r#"{"pad_token": "<pad>"}"#, r#"{"model_max_length": 1}"#] {
            std::fs::write(tok_dir.join("tokenizer_config.json"), config).unwrap();
            assert_bad_file(dir.path(), "tokenizer_config.json");
        }
    }

    /// A `tokenizer.json` from `tokenizers` < 0.20, with the merges as `"a b"` strings, gives
    /// the same tokens.
    #[test]
    fn legacy_merges_tokenize_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).unwrap();
        let fixture = std::fs::read_to_string(fixtures().join("tokenizer-json/tokenizer.json")).unwrap();
        let mut json: Value = serde_json::from_str(&fixture).unwrap();
        let joined = |m: &Value| Value::from(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()));
        let merges = json["model"]["merges"].as_array().unwrap().iter().map(joined).collect();
        json["model"]["merges"] = Value::Array(merges);
        std::fs::write(tok_dir.join("tokenizer.json"), json.to_string()).unwrap();

        let tok = load(dir.path()).unwrap();
        let (meta, ids, _) = reference("tiny-a");
        for (prompt, ids) in meta.prompts.iter().zip(&ids) {
            assert_eq!(&tok.encode(prompt).unwrap().ids, ids, "{prompt:?}");
        }
    }

    #[test]
    fn python_strip() {
        assert_eq!(py_strip(" \u{1c}a b\u{1f}\u{3000}\n"), "a b");
        assert_eq!(py_strip("\u{200b}a"), "\u{200b}a"); // zero-width space: not whitespace
    }
}
