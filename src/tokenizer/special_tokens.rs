//! The special tokens and the length, resolved from `tokenizer_config.json`,
//! `special_tokens_map.json` and `tokenizer.json`'s added tokens as transformers 5's
//! `from_pretrained` resolves them.

use std::collections::BTreeMap;

use serde::Deserialize;
use tokenizers::models::bpe::Vocab;
use tokenizers::AddedToken;

use super::Parsed;

/// `CLIPTokenizer.__init__`'s BOS, EOS, UNK and PAD, for a token no file names.
const DEFAULT_NAMES: [&str; 4] = ["<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"];

/// CLIP's context length (every Würstchen text encoder's `max_position_embeddings`), for a
/// `tokenizer_config.json` without `model_max_length` or with transformers' "unset" `int(1e30)`.
const DEFAULT_MAX_LEN: usize = 77;

/// Above this, `model_max_length` is transformers' "no limit" marker, not a length.
const MAX_SANE_MAX_LEN: f64 = 65_536.0;

/// `tokenizer_config.json`; `special_tokens_map.json` has its named tokens.
#[derive(Deserialize)]
pub(super) struct TokenizerConfig {
    /// id -> token; a `BTreeMap`, so in id order.
    added_tokens_decoder: Option<BTreeMap<u32, TokenDict>>,
    bos_token: Option<NamedToken>,
    eos_token: Option<NamedToken>,
    unk_token: Option<NamedToken>,
    pad_token: Option<NamedToken>,
    pub(super) model_max_length: Option<f64>,
}

impl TokenizerConfig {
    /// BOS, EOS, UNK and PAD, where the file names them.
    fn named(&self) -> [Option<&NamedToken>; 4] {
        [&self.bos_token, &self.eos_token, &self.unk_token, &self.pad_token].map(Option::as_ref)
    }
}

/// A named special token: a string (`AddedToken(content, special=True)`) or an `AddedToken` dict.
#[derive(Deserialize)]
#[serde(untagged)]
enum NamedToken {
    Content(String),
    Dict(TokenDict),
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
pub(super) struct TokenDict {
    content: String,
    single_word: Option<bool>,
    lstrip: Option<bool>,
    rstrip: Option<bool>,
    pub(super) normalized: Option<bool>,
    special: Option<bool>,
}

impl TokenDict {
    /// `AddedToken(**dict)`, plus `special=True` where transformers adds it: every flag false
    /// unless the dict says otherwise, `normalized` then defaulting to `not special`.
    pub(super) fn token(&self, force_special: bool) -> AddedToken {
        let special = force_special || self.special.unwrap_or(false);
        AddedToken::from(self.content.as_str(), special)
            .single_word(self.single_word.unwrap_or(false))
            .lstrip(self.lstrip.unwrap_or(false))
            .rstrip(self.rstrip.unwrap_or(false))
            .normalized(self.normalized.unwrap_or(!special))
    }
}

/// The special tokens: BOS and EOS as the post-processor takes them (token, id).
pub(super) struct Settings {
    pub(super) bos: (String, u32),
    pub(super) eos: (String, u32),
    pub(super) unk: String,
    pub(super) pad_id: u32,
    /// In the order transformers adds them: the added tokens' table by id, then the named
    /// special tokens it lacks.
    pub(super) added: Vec<AddedToken>,
}

/// transformers 5 (`PreTrainedTokenizerBase._from_pretrained`, `TokenizersBackend.__init__`):
/// with an `added_tokens_decoder` in `tokenizer_config.json`, that table is the added tokens and
/// `special_tokens_map.json` is ignored; without one, `special_tokens_map.json` overrides the
/// config's named tokens and `tokenizer.json`'s `added_tokens` are the table. Named special
/// tokens missing from the table are added after it, as special tokens.
pub(super) fn resolve_settings(
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
pub(super) fn model_max_length(value: Option<f64>) -> Parsed<usize> {
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
